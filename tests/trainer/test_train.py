"""Training runs in-process through trainer.train() on the prepared sample corpus (CPU, seconds each):
logging, checkpoints, exact resume, divergence, fused updates, every optimizer."""

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from data import TrainBatches
from model import Transformer, flops_per_token
from tests.helpers.runs import losses, run, tiny_overrides, tiny_trainer
from trainer import checkpoint as ckpt
from trainer import throughput_window
from trainer import trainer as trainer_module
from trainer.config import ConfigError, load_config
from trainer.metrics import read_metrics
from trainer.resume_policy import check_resume_compatible
from trainer.run_lock import RunDirError
from trainer.trainer import StopFlag, TrainingDiverged


def test_short_run_learns_and_writes_everything(tmp_path, sample_tokens):
    cfg, result = run(tmp_path, sample_tokens, **{"train.max_steps": 12, "eval.interval": 6})
    run_dir = tmp_path / "run"
    train_losses = losses(run_dir)
    assert sorted(train_losses) == list(range(1, 13))
    assert sum(list(train_losses.values())[-3:]) / 3 < sum(list(train_losses.values())[:3]) / 3
    assert [s for s, _ in result.val_losses] == [0, 6, 12]
    assert result.val_losses[-1][1] < result.val_losses[0][1] - 0.5
    records = read_metrics(run_dir / "metrics.jsonl")
    keys = set().union(*records)
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "val/loss",
        "val/ppl",
        "throughput/tokens_per_s",
        "memory/peak_bytes",
        "throughput/data_wait_frac",
    ):
        assert key in keys
    assert "throughput/mfu" not in keys  # no MFU on CPU
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(run_dir / "config.yaml") == cfg
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None
    assert latest is not None
    assert latest.name == "step_00000012.pt"
    state = ckpt.load_checkpoint(latest)  # weights_only=True
    assert state["progress"] == {
        "step": 12,
        "tokens_seen": 12 * 4 * 32,
        "eval_pending": False,
    }  # the step is stored once
    assert "step" not in state["data"] and "scheduler" not in state


def test_resume_is_bit_exact(tmp_path, sample_tokens):
    """2k steps uninterrupted vs k steps, then resumed from the step-k checkpoint."""
    run(tmp_path, sample_tokens, "straight")
    run(tmp_path, sample_tokens, "resumed")
    resumed = tmp_path / "resumed"
    # Undo everything after step 3, as if the process had died right after that checkpoint.
    (resumed / "checkpoints" / "step_00000006.pt").unlink()
    _, result = run(tmp_path, sample_tokens, "resumed")
    assert result.final_step == 6
    a, b = losses(tmp_path / "straight"), losses(resumed)
    assert sorted(b) == list(range(1, 7))
    assert all(a[s] == b[s] for s in a), (a, b)  # bit for bit
    final_a = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_00000006.pt")
    final_b = ckpt.load_checkpoint(resumed / "checkpoints" / "step_00000006.pt")
    for name, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][name]), name


def test_a_warmup_longer_than_the_run_is_warned_about(tmp_path, sample_tokens, capsys):
    run(tmp_path, sample_tokens, **{"train.max_steps": 2, "scheduler.warmup_steps": 5})
    out = capsys.readouterr().out
    assert "warning: scheduler.warmup_steps=5 >= train.max_steps=2: the learning rate warms up for the whole run" in out
    run(tmp_path / "b", sample_tokens, **{"train.max_steps": 6, "scheduler.warmup_steps": 5})
    assert "warning: scheduler.warmup_steps" not in capsys.readouterr().out


def test_a_run_longer_than_the_prepared_data_is_warned_about(tmp_path, sample_tokens, capsys):
    """More sequences than the data has windows: the order goes on into a reshuffled next epoch, which a
    comparison of optimizers should know (a FLOP-matched run re-reads data that a shorter one does not)."""
    short = tiny_trainer(tmp_path / "short", sample_tokens)
    assert "epochs of the prepared data" not in capsys.readouterr().out
    windows, global_batch = short.data.n_windows, short.cfg.train.global_batch
    steps = windows // global_batch + 1  # one step more than one pass
    tiny_trainer(tmp_path / "long", sample_tokens, **{"train.max_steps": steps})
    sequences = steps * global_batch
    needed = sequences * 32 + 1
    assert (
        f"warning: train.max_steps={steps} x train.global_batch=4 = {sequences:,} sequences is "
        f"{sequences / windows:.2f} epochs of the prepared data ({windows:,} windows of data.seq_len=32): later "
        f"steps repeat training data; for one pass prepare at least {needed:,} tokens "
        f"(tools/prepare_data.py --max_tokens {needed})"
    ) in capsys.readouterr().out
    # A resume that raises max_steps past the data is warned about too.
    run(tmp_path, sample_tokens, "resumed", **{"train.max_steps": 2})
    capsys.readouterr()
    resumed = tiny_trainer(tmp_path / "resumed", sample_tokens, **{"train.max_steps": steps})
    assert resumed.resume_from is not None and "epochs of the prepared data" in capsys.readouterr().out


def test_rerun_of_a_finished_run_does_nothing(tmp_path, sample_tokens, capsys):
    run(tmp_path, sample_tokens, **{"train.max_steps": 2})
    capsys.readouterr()
    _, result = run(tmp_path, sample_tokens, **{"train.max_steps": 2})
    assert result.final_step == 2 and result.val_losses == []
    out = capsys.readouterr().out
    assert "run already complete at step 2 (train.max_steps=2); to train longer raise --train.max_steps" in out


def test_resume_false_on_a_directory_with_checkpoints_is_refused_before_any_work(tmp_path, sample_tokens):
    """Starting over beside an earlier start's checkpoints would mix two runs (the new checkpoints pruned by the
    old ones' higher steps, config.yaml rewritten): refused, and the directory is left as it was."""
    run(tmp_path, sample_tokens, **{"train.max_steps": 4, "checkpoint.interval": 2})
    run_dir = tmp_path / "run"
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    with pytest.raises(RunDirError, match=r"checkpoint.resume=false, but .* holds checkpoints of an earlier start"):
        run(tmp_path, sample_tokens, **{"train.max_steps": 2, "optim.name": "adafactor", "checkpoint.resume": False})
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, sample_tokens, monkeypatch):
    real = trainer_module.forward_backward
    calls = []

    def poisoned(model, micro_batches, **kw):
        loss = real(model, micro_batches, **kw)
        calls.append(1)
        if len(calls) == 5:  # step 5 produces a NaN loss (and NaN gradients)
            for p in model.parameters():
                p.grad.fill_(float("nan"))
            return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer_module, "forward_backward", poisoned)
    with pytest.raises(
        TrainingDiverged,
        match=r"non-finite loss at step 5 .*Last good checkpoint: .*step_00000003\.pt\. Likely causes with these "
        r"settings: the peak learning rate optim\.lr=0\.01 is too high for adamw: try --optim\.lr=0\.00316",
    ):
        run(tmp_path, sample_tokens)
    latest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest is not None
    assert latest is not None
    assert latest.name == "step_00000003.pt"
    state = ckpt.load_checkpoint(latest)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_fused_update_refuses_gradient_clipping_when_the_config_loads(tmp_path, sample_tokens):
    with pytest.raises(ConfigError, match="max_grad_norm=0"):
        load_config(
            "configs/tiny.yaml", tiny_overrides(tmp_path / "run", sample_tokens, **{"train.fused_update": True})
        )


def test_fused_update_trains_and_matches_the_ordinary_path(tmp_path, sample_tokens):
    extra = {"train.max_grad_norm": 0, "train.max_steps": 4, "optim.fused": False}
    run(tmp_path, sample_tokens, "plain", **extra)
    run(tmp_path, sample_tokens, "fused", **extra, **{"train.fused_update": True})
    assert losses(tmp_path / "plain") == losses(tmp_path / "fused")


def test_resume_with_the_other_fused_setting_is_a_clear_error(tmp_path, sample_tokens):
    run(tmp_path, sample_tokens, **{"train.max_steps": 3, "train.max_grad_norm": 0})
    # The resume policy refuses it before any work; the optimizer layout check behind it
    # (tests/trainer/test_update.py) would refuse it too.
    with pytest.raises(
        ConfigError, match=r"step_00000003\.pt with a different setup.*\n  train.fused_update: False -> True"
    ):
        run(tmp_path, sample_tokens, **{"train.max_steps": 3, "train.max_grad_norm": 0, "train.fused_update": True})


@pytest.mark.parametrize("name", ["adafactor", "galore_adamw", "galore_adafactor", "adamem", "adalomo"])
def test_every_optimizer_trains_and_resumes_bit_exact_from_the_cli(tmp_path, sample_tokens, name):
    """Through train(): the projector refreshes every 2 steps, so the resumed run (from step 3)
    recomputes projections from restored state."""
    extra = {"optim.name": name, "optim.lr": 3e-3}
    if name in ("galore_adamw", "galore_adafactor", "adamem"):
        extra |= {"optim.rank": 8, "optim.update_proj_gap": 2}
    run(tmp_path, sample_tokens, "straight", **extra)
    run(tmp_path, sample_tokens, "resumed", **extra)
    (tmp_path / "resumed" / "checkpoints" / "step_00000006.pt").unlink()
    run(tmp_path, sample_tokens, "resumed", **extra)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == list(range(1, 7)) and all(a[s] == b[s] for s in a), (a, b)
    assert a[6] < a[1]
    records = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "train/loss" in r]
    if name in ("galore_adamw", "galore_adafactor", "adamem"):
        # 3 refreshes (steps 1, 3, 5) for each low-rank matrix: 4 per block x 2 blocks.
        assert records[-1]["optim/proj_updates"] == 3 * 8 and records[-1]["optim/svd_failures"] == 0


def test_a_run_saved_in_the_version_1_layout_resumes_bit_exact(tmp_path, sample_tokens):
    """Checkpoints written before components (format 1: the step in three places) still resume."""
    run(tmp_path, sample_tokens, "straight")
    run(tmp_path, sample_tokens, "old")
    checkpoints = tmp_path / "old" / "checkpoints"
    (checkpoints / "step_00000006.pt").unlink()
    v2 = ckpt.load_checkpoint(checkpoints / "step_00000003.pt")
    step, tokens = v2["progress"]["step"], v2["progress"]["tokens_seen"]
    v1 = {  # exactly the dict the version-1 trainer saved
        "format_version": 1,
        "model": v2["model"],
        "optimizer": v2["optimizer"],
        "scheduler": {"step": step},
        "step": step,
        "tokens_seen": tokens,
        "data": {"step": step, "epoch": 0, "position": step * 4, "tokens_seen": tokens, **v2["data"]},
        "rng": v2["rng"],
        "config": v2["config"],
    }
    torch.save(v1, checkpoints / "step_00000003.pt")
    _, result = run(tmp_path, sample_tokens, "old")
    assert result.final_step == 6
    assert losses(tmp_path / "straight") == losses(tmp_path / "old")


def test_resume_with_settings_that_cannot_change_fails_before_any_work(tmp_path, sample_tokens):
    run(tmp_path, sample_tokens, **{"train.max_steps": 3})
    run_dir = tmp_path / "run"
    config_before = (run_dir / "config.yaml").read_text()
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    bad = {"train.max_steps": 6, "optim.name": "adafactor", "optim.beta1": "null", "model.d_model": 128}
    with pytest.raises(ConfigError) as e:
        run(tmp_path, sample_tokens, **bad)
    message = str(e.value)
    assert "cannot resume from" in message and "step_00000003.pt" in message
    assert "optim.name: 'adamw' -> 'adafactor'" in message and "optim.beta1: 0.9 -> None" in message
    assert "model.d_model: 64 -> 128" in message and "train.max_steps" not in message  # max_steps may change
    assert "another --run.dir" in message
    assert (run_dir / "config.yaml").read_text() == config_before  # nothing was written
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    assert not (run_dir / "resumes.jsonl").exists()


def test_allowed_changes_on_resume_are_recorded_in_the_run_history(tmp_path, sample_tokens):
    run(tmp_path, sample_tokens, **{"train.max_steps": 3})
    run(tmp_path, sample_tokens, **{"train.max_steps": 5, "optim.lr": 5e-3})
    run_dir = tmp_path / "run"
    history = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert len(history) == 1
    assert history[0]["step"] == 3 and history[0]["checkpoint"] == "step_00000003.pt"
    assert history[0]["changed"] == {"optim.lr": [0.01, 0.005], "train.max_steps": [3, 5]}
    assert load_config(run_dir / "config.yaml").optim.lr == 5e-3  # config.yaml: the config in force


def test_a_finished_run_rerun_with_other_settings_writes_nothing(tmp_path, sample_tokens):
    run(tmp_path, sample_tokens, **{"train.max_steps": 2})
    before = (tmp_path / "run" / "config.yaml").read_text()
    _, result = run(tmp_path, sample_tokens, **{"train.max_steps": 1})
    assert result.final_step == 2 and (tmp_path / "run" / "config.yaml").read_text() == before
    assert not (tmp_path / "run" / "resumes.jsonl").exists()


@pytest.mark.parametrize("interrupted", [0, 3])
def test_a_stop_during_evaluation_saves_at_once_and_the_evaluation_runs_on_resume(
    tmp_path, sample_tokens, monkeypatch, interrupted
):
    """Also at step 0: the run saves there instead of training a step first, so no step-0 loss is lost."""
    real, calls = trainer_module.evaluate, []

    def signalled_during_an_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1 + interrupted // 3:  # SIGTERM arrives while the evaluation at `interrupted` runs
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", signalled_during_an_evaluation)
    _, result = run(tmp_path, sample_tokens)
    assert result.stopped_by_signal and result.final_step == interrupted
    assert [s for s, _ in result.val_losses] == [0, 3][: interrupted // 3]  # the interrupted one is not logged
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{interrupted:08d}.pt")
    assert state["progress"]["eval_pending"] is True and state["progress"]["step"] == interrupted
    monkeypatch.undo()
    _, resumed = run(tmp_path, sample_tokens)
    assert [s for s, _ in resumed.val_losses] == [0, 3, 6][interrupted // 3 :]  # the pending one first
    assert resumed.final_step == 6 and not resumed.stopped_by_signal
    val_steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val/loss" in r]
    assert val_steps == [0, 3, 6]


def test_a_stop_during_the_final_evaluation_on_resume_is_reported_and_kept_pending(
    tmp_path, sample_tokens, monkeypatch
):
    """The final evaluation (step 6 of 6) is stopped, then stopped again when the resume runs it: the second start
    reports the stop (train.py then says how to resume) and keeps the evaluation pending; the third finishes it
    and saves that."""
    real = trainer_module.Trainer.evaluate

    def signalled_at_step_6(self, step: int) -> None:
        if step == 6:  # SIGTERM arrives while the final evaluation runs
            os.kill(os.getpid(), signal.SIGTERM)
        real(self, step)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", signalled_at_step_6)
    for start in range(2):
        _, result = run(tmp_path, sample_tokens)
        assert result.stopped_by_signal and result.final_step == 6, start
        state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000006.pt")
        assert state["progress"]["eval_pending"] is True
    monkeypatch.undo()
    _, result = run(tmp_path, sample_tokens)
    assert not result.stopped_by_signal and [s for s, _ in result.val_losses] == [6]
    val_steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val/loss" in r]
    assert val_steps == [0, 3, 6]
    # The finished evaluation is saved: the checkpoint no longer holds it pending, so a re-run does not redo it.
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000006.pt"
    assert result.checkpoint == checkpoint and ckpt.load_checkpoint(checkpoint)["progress"]["eval_pending"] is False


def test_bf16_autocast_follows_the_fp32_loss_curve_to_bf16_precision(tmp_path, sample_tokens):
    """bf16 autocast with fp32 master weights and optimizer state (train.precision=bf16) trains like fp32: the
    same loss curve to bf16 precision over a short run, through the chunked loss."""
    common = {"train.max_steps": 6, "eval.interval": 0, "checkpoint.interval": 6}
    run(tmp_path, sample_tokens, "fp32", **common)
    _, result = run(tmp_path, sample_tokens, "bf16", **common, **{"train.precision": "bf16"})
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert sorted(bf16) == sorted(fp32) == list(range(1, 7))
    for step, loss in fp32.items():
        assert bf16[step] == pytest.approx(loss, rel=1e-2), step
    assert bf16 != fp32  # bf16 compute really ran
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "bf16" / "checkpoints", 6))
    assert all(t.dtype == torch.float32 for t in state["model"].values())  # fp32 master weights


class FakeClock:
    """time.perf_counter for the trainer: it moves only when the test says."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_throughput_is_timed_between_device_reads_without_eval_and_save(tmp_path, sample_tokens, monkeypatch):
    """On a GPU a step's host time leaves out the queued device work that the next check point's read waits for:
    tokens/s, MFU and the data-wait fraction are timed from one read to the next log's read, that wait included,
    and the evaluations and checkpoints between them left out (trainer/throughput_window.py). A fake clock: each
    step takes 0.1 s on the host, each read 1 s (the device's queue), each evaluation and checkpoint 100 s, and each
    batch 0.05 s to arrive."""
    clock = FakeClock()
    monkeypatch.setattr(trainer_module, "time", clock)
    monkeypatch.setattr(throughput_window, "time", clock)

    def taking(seconds, method):
        def timed(self, *args):
            clock.now += seconds
            return method(self, *args)

        return timed

    T = trainer_module.Trainer
    for name, seconds in (("train_step", 0.1), ("check_steps", 1.0), ("evaluate", 100.0), ("save", 100.0)):
        monkeypatch.setattr(T, name, taking(seconds, getattr(T, name)))
    original_init = T.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        source = self.data.batches

        def slow(step):
            for batch in source(step):
                clock.now += 0.05
                yield batch

        self.data.batches = slow

    monkeypatch.setattr(T, "__init__", init)
    overrides = {"train.max_steps": 6, "log.interval": 2, "eval.interval": 2, "checkpoint.interval": 4}
    run(tmp_path, sample_tokens, **overrides)
    logged = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r}
    assert sorted(logged) == [2, 4, 6]
    for r in logged.values():  # 2 steps of 4 x 32 tokens over 2 x (0.05 + 0.1) + 1 s: no evaluation, no save
        assert r["throughput/tokens_per_s"] == pytest.approx(2 * 4 * 32 / 1.3)
        assert r["throughput/data_wait_frac"] == pytest.approx(0.1 / 1.3)


def test_a_closed_console_is_no_first_ctrl_c(capfd):
    """After request() (the console's reader went away), the user's first Ctrl-C still saves: only a second
    signalled Ctrl-C exits at once."""
    stop = StopFlag()
    stop.install()
    try:
        stop.request()
        os.kill(os.getpid(), signal.SIGINT)  # handled at once: a signal to this process, in the main thread
        assert stop.requested and stop.signalled
        assert "SIGINT: finishing this step, then saving and exiting (Ctrl-C again" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


@pytest.mark.parametrize("micro_batch", [1, 4])
def test_the_logged_loss_and_grad_norm_are_the_global_batch_means_whatever_the_micro_batching(
    tmp_path, sample_tokens, micro_batch
):
    """Independent reference: the initial model (the trainer seeds torch with run.seed before building it) on
    the first global batch, one plain mean cross-entropy over all its tokens, one backward. A loss denominator
    of one micro-batch's tokens (or one divided by the micro-batch count twice) scales both by the count."""
    overrides = {"train.max_steps": 1, "train.micro_batch": micro_batch, "eval.interval": 0, "log.tensorboard": False}
    cfg, _ = run(tmp_path, sample_tokens, **overrides)
    record = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r)
    torch.manual_seed(cfg.run.seed)
    model = Transformer(cfg.model)
    inputs, targets = next(TrainBatches(cfg.data, global_batch=cfg.train.global_batch).batches(0))
    loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets.flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    assert record["train/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert record["train/grad_norm"] == pytest.approx(norm.item(), rel=1e-4)


def test_a_sparse_log_line_holds_its_own_steps_loss_and_norm(tmp_path, sample_tokens):
    """With log.interval 2, check_steps reads two steps at once: the line of step s must carry step s's
    loss and grad norm (as a run logging every step records them), not the first unlogged step's."""
    common = {"train.max_steps": 4, "eval.interval": 0, "checkpoint.interval": 4, "log.tensorboard": False}
    run(tmp_path, sample_tokens, "every", **common, **{"log.interval": 1})
    run(tmp_path, sample_tokens, "sparse", **common, **{"log.interval": 2})
    every = {r["step"]: r for r in read_metrics(tmp_path / "every" / "metrics.jsonl") if "train/loss" in r}
    sparse = {r["step"]: r for r in read_metrics(tmp_path / "sparse" / "metrics.jsonl") if "train/loss" in r}
    assert sorted(sparse) == [2, 4] and every[1]["train/loss"] != every[2]["train/loss"]
    for step, record in sparse.items():
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert record[key] == every[step][key], (step, key)


def test_the_last_step_is_evaluated_when_max_steps_is_no_multiple_of_the_interval(tmp_path, sample_tokens):
    _, result = run(tmp_path, sample_tokens, **{"train.max_steps": 5, "eval.interval": 3, "log.tensorboard": False})
    assert [s for s, _ in result.val_losses] == [0, 3, 5]
    logged = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val/loss" in r]
    assert logged == [0, 3, 5]


def test_mfu_is_the_windows_flops_over_its_seconds_and_the_peak(tmp_path, sample_tokens, monkeypatch):
    """No MFU on a CPU: a fake peak. tokens/s and MFU share the window's seconds, so whatever the clock says,
    MFU / (tokens/s) = FLOPs per token / peak (model/flops.py's count: no projected backward, no adapters)."""
    peak = 1e9
    monkeypatch.setattr(trainer_module, "device_peak_flops", lambda device: peak)
    overrides = {"train.max_steps": 4, "log.interval": 2, "eval.interval": 0, "log.tensorboard": False}
    cfg, _ = run(tmp_path, sample_tokens, **overrides)
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    for r in logged:
        assert r["throughput/mfu"] == pytest.approx(r["throughput/tokens_per_s"] * per_token / peak, rel=1e-9), r


def _saved_and_now(tmp_path, sample_tokens, **changed):
    """The checkpoint's config dict and a copy with `changed` ("section.key": value) applied: what the
    trainer hands check_resume_compatible (no training needed to ask the policy)."""
    saved = load_config("configs/tiny.yaml", tiny_overrides(tmp_path / "run", sample_tokens)).to_dict()
    now = {section: dict(values) for section, values in saved.items()}
    for key, value in changed.items():
        section, name = key.split(".", 1)
        assert name in now[section], key  # a real config key
        now[section][name] = value
    return saved, now


@pytest.mark.parametrize(
    ("key", "value"),
    [("train.global_batch", 8), ("data.seq_len", 16), ("data.seed", 7), ("optim.beta2", 0.9), ("model.n_layers", 3)],
)
def test_settings_that_change_the_data_order_or_the_state_are_refused_on_resume(tmp_path, sample_tokens, key, value):
    """Another global batch, sequence length or data seed reorders the samples the checkpoint's position counts;
    another optimizer hyperparameter or model shape makes the saved state mean something else."""
    saved, now = _saved_and_now(tmp_path, sample_tokens, **{key: value})
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000003.pt"
    with pytest.raises(ConfigError) as e:
        check_resume_compatible(saved, now, checkpoint)
    assert str(e.value) == (
        f"cannot resume from {checkpoint} with a different setup; these settings cannot change within a run:\n"
        f"  {key}: {saved[key.split('.')[0]][key.split('.')[1]]!r} -> {value!r}\n"
        f"Resume with the checkpoint's values (they are in {tmp_path / 'run' / 'config.yaml'}), "
        "or start a new run with another --run.dir."
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.micro_batch", 1),
        ("train.precision", "bf16"),
        ("train.engine", "fsdp2"),
        ("train.max_grad_norm", 0.5),
        ("data.prepared_dir", "/elsewhere/prepared"),
        ("scheduler.warmup_steps", 123),
        ("eval.interval", 77),
        ("checkpoint.keep_last", 9),
    ],
)
def test_settings_that_only_steer_the_rest_of_the_run_may_change_on_resume(tmp_path, sample_tokens, key, value):
    """Micro-batching, precision, the engine, clipping, where the data lives, the schedule and the intervals
    leave the checkpoint's meaning intact: the resume goes on and reports the change for resumes.jsonl."""
    saved, now = _saved_and_now(tmp_path, sample_tokens, **{key: value})
    old = saved[key.split(".")[0]][key.split(".")[1]]
    assert old != value
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000003.pt"
    assert check_resume_compatible(saved, now, checkpoint) == {key: (old, value)}


def test_a_checkpoint_from_before_a_config_key_existed_still_resumes(tmp_path, sample_tokens):
    """A key added to the config after the checkpoint was written (absent from its saved config) is not a change:
    the older run resumes with the key's default instead of being refused."""
    saved, now = _saved_and_now(tmp_path, sample_tokens)
    del saved["optim"]["factor_iters"], saved["train"]["fused_update"]
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000003.pt"
    assert check_resume_compatible(saved, now, checkpoint) == {}


def test_the_last_step_is_logged_and_saved_and_eval_interval_0_skips_the_step_0_evaluation(
    tmp_path: Path, sample_tokens: Path
) -> None:
    """max_steps 5 is no multiple of log.interval 2 nor of checkpoint.interval 3: step 5 is still logged and saved
    (the run's final result). eval.interval 0 turns periodic evaluation off, the step-0 one included: only the
    final evaluation runs."""
    overrides = {
        "train.max_steps": 5,
        "log.interval": 2,
        "eval.interval": 0,
        "checkpoint.interval": 3,
        "log.tensorboard": False,
    }
    _, result = run(tmp_path, sample_tokens, **overrides)
    logged = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r}
    assert sorted(logged) == [2, 4, 5]
    # The lr of each logged step's update (warmup 2 steps, then cosine over 3 to 0.1 x peak): step 2 (0-based 1)
    # at the peak, step 4 at 0.1 + 0.9 x (1 + cos(2 pi / 3)) / 2 = 0.325 of it, step 5 at 0.1.
    assert [logged[s]["train/lr"] for s in (2, 4, 5)] == pytest.approx([0.01, 0.00325, 0.001], rel=1e-9)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_00000003.pt",
        "step_00000005.pt",
    ]
    assert result.checkpoint is not None and result.checkpoint.name == "step_00000005.pt"
    assert [s for s, _ in result.val_losses] == [5]


def test_a_non_finite_gradient_norm_alone_diverges_and_a_restart_clears_the_marker(
    tmp_path: Path, sample_tokens: Path
) -> None:
    """A finite loss with an infinite gradient norm is a divergence too; it leaves diverged.json (what the study
    runner reads), which the next start of the run directory removes."""
    trainer = tiny_trainer(tmp_path / "run", sample_tokens)
    with pytest.raises(TrainingDiverged, match=r"^non-finite gradient norm at step 4 \(loss 2\.5, grad norm inf\)"):
        trainer._check_finite(4, 2.5, float("inf"))
    marker = json.loads((tmp_path / "run" / "diverged.json").read_text())
    assert marker["step"] == 4 and marker["message"].startswith("non-finite gradient norm at step 4")
    run(tmp_path, sample_tokens, **{"train.max_steps": 1, "eval.interval": 0, "log.tensorboard": False})
    assert not (tmp_path / "run" / "diverged.json").exists()


def test_divergence_causes_name_warmup_and_clipping_only_where_they_apply(tmp_path: Path, sample_tokens: Path) -> None:
    """scheduler.warmup_steps=2: steps 1 and 2 (1-based, as reported) are in warmup, step 3 is not. Clipping
    is only suggested where it may be set: a fused update refuses train.max_grad_norm > 0."""
    cpu = torch.device("cpu")

    def causes(step: int, **extra: object) -> str:
        cfg = load_config("configs/tiny.yaml", tiny_overrides(tmp_path / "run", sample_tokens, **extra))
        return "; ".join(trainer_module.divergence_causes(cfg, step, cpu))

    assert "optim.lr=0.01 is too high for adamw (this step was still in warmup): try --optim.lr=0.00316" in causes(2)
    assert "still in warmup" not in causes(3)
    clipping = "gradient clipping is off (train.max_grad_norm=0): try --train.max_grad_norm=1.0"
    assert clipping in causes(3, **{"train.max_grad_norm": 0})
    assert clipping not in causes(3, **{"train.max_grad_norm": 0, "train.fused_update": True})


def test_a_second_sigterm_still_saves(capfd: pytest.CaptureFixture[str]) -> None:
    """Only a second Ctrl-C (SIGINT) exits at once: a scheduler that sends SIGTERM twice still gets the save."""
    stop = StopFlag()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # handled at once: a signal to this process, in the main thread
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:  # caught: uncaught, it would end the whole pytest session
            pytest.fail("a second SIGTERM exited at once, without saving")
        assert stop.requested and stop.signalled
        assert capfd.readouterr().err == "\nSIGTERM: finishing this step, then saving and exiting\n"  # said once
    finally:
        stop.restore()


def test_a_tokenizer_as_large_as_the_model_vocabulary_fits_and_a_larger_one_is_refused(
    tmp_path: Path, sample_tokens: Path
) -> None:
    """The sample corpus's T5 tokenizer has 32000 ids: model.vocab_size=32000 holds them all."""
    assert tiny_trainer(tmp_path / "fits", sample_tokens, **{"model.vocab_size": 32000}).data is not None
    with pytest.raises(ConfigError) as e:
        tiny_trainer(tmp_path / "small", sample_tokens, **{"model.vocab_size": 31999})
    assert str(e.value) == (
        "the data's tokenizer has 32000 ids but model.vocab_size=31999; set --model.vocab_size to at least 32000 "
        "(a multiple of 128 is fastest)"
    )


def test_a_stop_between_check_points_checks_the_unread_steps_before_saving(
    tmp_path: Path, sample_tokens: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM after step 2 of a run that reads its metrics only every 6 steps: the stop saves at once, but first
    reads the unchecked steps; step 2's NaN stops the run without writing a checkpoint of the diverged model."""
    real = trainer_module.forward_backward
    calls: list[int] = []

    def poisoned_and_signalled(model: torch.nn.Module, micro_batches: list, **kw: Any) -> torch.Tensor:
        loss = real(model, micro_batches, **kw)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer_module, "forward_backward", poisoned_and_signalled)
    overrides = {"log.interval": 6, "eval.interval": 0, "checkpoint.interval": 6, "log.tensorboard": False}
    with pytest.raises(TrainingDiverged, match=r"^non-finite loss at step 2 "):
        run(tmp_path, sample_tokens, **overrides)
    assert len(calls) == 2
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))
