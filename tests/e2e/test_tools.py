import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tarfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from model import ModelConfig, Transformer
from optim import OptimConfig
from tests.helpers.runs import REPO
from tools import bench_engines, bench_optim, bench_step, model_info, plot_runs
from trainer.memory_accounting import measure
from trainer.trainer import Trainer


def run_tool(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_model_info_prints_counts_and_flops():
    out = run_tool("tools/model_info.py", "configs/210m.yaml")
    assert out.returncode == 0, out.stderr
    assert "216,818,688" in out.stdout and "151,020,544" in out.stdout
    assert "1,179,015,168" in out.stdout  # FLOPs/token at seq_len 512
    bad = run_tool("tools/model_info.py", "configs/210m.yaml", "--model.widht=3")
    assert bad.returncode == 1 and "unknown config key model.widht" in bad.stderr


def test_sweep_expands_the_grid_and_validates(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        f"config: {REPO / 'configs/tiny.yaml'}\n"
        "grid: {optim.lr: [1.0e-3, 3.0e-3], optim.weight_decay: [0.0, 0.1]}\n"
        "run_dir: runs/s/lr{optim.lr}_wd{optim.weight_decay}\n"
        "overrides: {train.max_steps: 7}\n"
    )
    out = run_tool("tools/sweep.py", str(sweep), "--launcher", "torchrun --nproc_per_node=8")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("torchrun --nproc_per_node=8 train.py")
    assert "--optim.lr=0.001 --optim.weight_decay=0.0 --run.dir=runs/s/lr0.001_wd0.0" in lines[0]
    assert all("--train.max_steps=7" in line for line in lines)
    sweep.write_text(f"config: {REPO / 'configs/tiny.yaml'}\ngrid: {{optim.lrr: [1]}}\nrun_dir: x\n")
    bad = run_tool("tools/sweep.py", str(sweep))
    assert bad.returncode == 1 and "optim.lrr" in bad.stderr
    empty = run_tool("tools/sweep.py", str(sweep), "--launcher", "")
    assert empty.returncode == 2 and "--launcher is empty" in empty.stderr


def test_a_stopped_sweep_lets_the_running_trainer_save_and_continues_on_re_run(tmp_path, sample_tokens):
    """SIGINT to `tools/sweep.py --run`: the trainer saves and exits, the sweep ends (130) without starting the next
    run, and the same command continues. Started with PATH lacking the venv: `python` is the sweep's interpreter."""
    import signal
    import time

    from tests.helpers.runs import losses, tiny_overrides
    from trainer import checkpoint as ckpt

    overrides = dict(o[2:].split("=", 1) for o in tiny_overrides(tmp_path, sample_tokens, **{"eval.interval": 0}))
    del overrides["run.dir"], overrides["optim.lr"]  # the sweep's: its run_dir and grid
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        f"config: {REPO / 'configs/tiny.yaml'}\n"
        "grid: {optim.lr: [1.0e-3, 3.0e-3]}\n"
        f"run_dir: {tmp_path}/lr{{optim.lr}}\n"
        f"overrides: {json.dumps({**overrides, 'train.max_steps': 100000, 'checkpoint.interval': 100000})}\n"
    )
    env = {**os.environ, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "tools/sweep.py", str(sweep), "--run"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first, second = tmp_path / "lr0.001", tmp_path / "lr0.003"
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(first)) < 3 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # to the sweep only: it forwards the stop
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "error: sweep stopped by SIGINT" in err and "Traceback" not in err, err
    saved = ckpt.latest_checkpoint(first / "checkpoints")
    assert saved is not None and ckpt.load_checkpoint(saved)["progress"]["step"] == max(losses(first))
    assert not second.exists()
    # The same command continues: the stopped run resumes (here to a lower max_steps: it is complete at once).
    step = max(losses(first))
    sweep.write_text(sweep.read_text().replace('"train.max_steps": 100000', f'"train.max_steps": {step}'))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"run already complete at step {step}" in done.stdout and max(losses(second)) == step


def test_plot_runs_writes_a_png(tmp_path):
    for name, losses in (("a", [5.0, 4.0]), ("b", [5.0, 3.5])):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "val/loss": v}) + "\n" for s, v in zip((0, 10), losses, strict=True))
        )
    out = run_tool("tools/plot_runs.py", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "p.png"))
    assert out.returncode == 0, out.stderr
    assert "final val/loss 3.5000 at step 10" in out.stdout
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_runs_refuses_bad_input_with_one_error_line(tmp_path, capsys):
    from tools import plot_runs

    run = tmp_path / "a"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 5.0}) + "\n")
    png = str(tmp_path / "p.png")
    cases = [
        ([str(run), "--out", str(tmp_path / "p.txt")], r"the figure's name must end in .png, .pdf, .svg"),
        ([str(run), "--out", str(tmp_path / "no" / "p.png")], rf"the directory {tmp_path / 'no'} does not exist"),
        ([str(tmp_path / "nope"), "--out", png], rf"{tmp_path / 'nope'} does not exist: pass run directories"),
        ([str(tmp_path), "--out", png], rf"{tmp_path} has no metrics.jsonl: pass run directories"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exited:
            plot_runs.main(argv)
        assert exited.value.code == 2 and re.search("error: .*" + message, capsys.readouterr().err), argv
    # A metrics.jsonl given for its run; a metric no run logs lists the ones they do.
    assert plot_runs.main([str(run / "metrics.jsonl"), "--metric", "val/los", "--out", png]) == 1
    assert "error: none of the runs has val/los in metrics.jsonl; they log: train/loss" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(SystemExit):
        plot_runs.main([str(run), "--out", png])
    err = capsys.readouterr().err
    assert f"error: {run / 'metrics.jsonl'}" in err and "line 2" in err and "Traceback" not in err, err


def test_bench_engines_prints_the_per_rank_table_at_a_tiny_size():
    """tools/bench_engines.py at the test's size: every supported optimizer x engine row, and the fsdp2
    row's arithmetic from the accounted one-rank step (no timing asserts)."""

    table = bench_engines.rows(["tiny"], [1, 2], micro_batch=2, seq_len=64)
    assert {(r["optimizer"], r["engine"]) for r in table} >= {("adamw", "fsdp2"), ("adamem", "ddp"), ("adalomo", "-")}
    row = next(r for r in table if r["optimizer"] == "adamw" and r["engine"] == "fsdp2")

    cfg = ModelConfig.from_flavor("tiny")
    m = measure(cfg, OptimConfig(name="adamw"), False, 2, 64, "meta", shard_ranks=2)
    layout = bench_engines.layout_bytes(cfg)
    half = -(-m["weights"] // 2)
    assert m["state_sharded"] < m["state"] and row["state"] == m["state_sharded"]
    grads = layout["head"] + layout["block"] + half  # the root's head gradients live through backward
    assert row["total"] == half + m["state_sharded"] + m["activations"] + grads + layout["root"] + 2 * layout["block"]
    fused = next(r for r in table if r["optimizer"] == "adalomo" and r["fused"] and r["engine"] == "fsdp2")
    assert fused["grads"] == layout["head"] + layout["block"]
    one = next(r for r in table if r["optimizer"] == "adamw" and r["ranks"] == 1)
    # Weights and state halve at 2 ranks; the total need not fall at this size, where the unsharded vocab-sized
    # output layer and its gradient dominate.
    assert row["weights"] < one["weights"] and row["state"] < one["state"]
    # DeepSpeed's rows: ZeRO-3 AdamW (its fp32 partition copy counted with the state), AdaLomo the LOMO way.
    z3 = next(r for r in table if r["optimizer"] == "adamw" and r["engine"] == "ds-z3")
    assert z3["state"] == half + -(-m["state"] // 2) and z3["grads"] == half + m["weights"]  # bucket >= all grads here
    offload = next(r for r in table if r["engine"] == "ds-z3+offload")
    assert offload["state"] == 0 and offload["total"] < z3["total"]
    assert {r["optimizer"] for r in table if r["engine"] == "ds-z3-lomo"} == {"adalomo"}


def test_bench_step_prints_the_table_with_adamw_as_the_unit(capsys, monkeypatch, sample_tokens):
    """tools/bench_step.py at a tiny size: it runs the trainer's steps for each optimizer, prints one row each
    with the ratio to AdamW first, and counts no host syncs in a steady step (no timing asserts). AdaLomo's
    updates compiled (--compile-optim: optim.compile, inside the fused backward); the others do not read it. The
    trainers measured before are freed when the next is timed."""
    args = ["--flavor", "tiny", "--seq-len", "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1"]
    optimizers = ["--optim", "adamw", "galore_adamw", "adalomo", "--compile-optim"]
    live = []  # Trainers alive while one is timed: its peak memory must be its own

    def time_steps(trainer, *args, **kwargs):
        live.append(sum(type(o) is Trainer for o in gc.get_objects()))  # type(): weak proxies too
        return timed(trainer, *args, **kwargs)

    timed = bench_step.time_steps
    monkeypatch.setattr(bench_step, "time_steps", time_steps)
    rows = bench_step.main([*args, *optimizers, "--data", str(sample_tokens)])
    assert live == [1, 1, 1, 1], live  # adamw, galore_adamw (steady, then refresh), adalomo
    out = capsys.readouterr().out
    assert [r["optimizer"] for r in rows] == ["adamw", "galore_adamw", "adalomo (fused)"]
    assert "| 1.000x | adamw |" in out and "| vs adamw | optimizer | tokens/s |" in out
    assert ", compiled updates;" in out
    assert all(r["syncs"] == 0 for r in rows), [r["sync_sites"] for r in rows]
    galore = rows[1]  # the refresh step (an SVD per matrix) amortised over T = 200 steps; no timing compared
    assert galore["refresh"] > 0 and rows[0]["refresh"] is None
    assert galore["amortised"] == pytest.approx((galore["refresh"] + 199 * galore["step"]) / 200)
    assert galore["tokens_per_s"] * galore["amortised"] == pytest.approx(2 * 32)  # a run's tokens/s: SVD amortised
    assert f"| {galore['amortised'] / rows[0]['amortised']:.3f}x | galore_adamw |" in out  # over AdamW's step
    assert all(0 < r["accounted"] <= r["formula"] for r in rows)


def test_bench_step_accumulates_micro_batches_as_the_configs_do(capsys, sample_tokens, tmp_path):
    """--accumulate K: a step is K micro-batches (the configs' global batch), and a fused row is accounted as
    ordinary (the first K - 1 micro-batches' gradients stay until the last backward)."""
    # The flags as the data tools spell theirs (--seq_len, --micro_batch): either spelling is accepted.
    args = ["--flavor", "tiny", "--seq_len", "32", "--micro_batch=2", "--accumulate", "3", "--steps", "1"]
    rows = bench_step.main([*args, "--warmup", "1", "--optim", "adamw", "adalomo", "--data", str(sample_tokens)])
    assert "micro-batch 2 x 3 per step" in capsys.readouterr().out
    for r in rows:
        assert r["tokens_per_s"] * r["amortised"] == pytest.approx(3 * 2 * 32)
    ns = argparse.Namespace(
        flavor="tiny",
        data=str(sample_tokens),
        seq_len=32,
        micro_batch=2,
        accumulate=3,
        fused=[],
        device="cpu",
        compile=False,
        compile_optim=False,
    )
    cfg = bench_step.bench_config(ns, "adalomo", tmp_path, gap=1)
    assert cfg.train.global_batch == 6 and cfg.train.micro_batch == 2 and cfg.train.fused_update
    ordinary, fused = (measure(cfg.model, cfg.optim, f, 2, 32, "meta")["peak"] for f in (False, True))
    assert rows[1]["accounted"] == ordinary > fused
    bad = run_tool("tools/bench_step.py", "--accumulate", "0")
    assert bad.returncode == 2 and "--accumulate must be at least 1, got 0" in bad.stderr


@pytest.mark.parametrize(
    "bad,message",
    [
        (
            ["--optim", "adamw", "galore_adamww"],
            "unknown optimizer optim.name='galore_adamww'. Did you mean 'galore_adamw'",
        ),
        (["--flavor", "tinyy"], "unknown model.flavor 'tinyy'. Did you mean 'tiny'"),
        (["--optim", "adamw", "--data", "/nonexistent"], "prepared data directory missing: /nonexistent"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
    ],
)
def test_bench_step_refuses_bad_input_with_one_error_line_before_timing_anything(capsys, bad, message):
    with pytest.raises(SystemExit) as exited:
        bench_step.main(["--steps", "1", "--warmup", "0", *bad])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and "error: " + message in err
    assert "| 1.000x |" not in out  # nothing was timed


def test_bench_step_measures_adamw_first_and_names_the_unit(capsys, sample_tokens):
    args = ["--flavor", "tiny", "--seq-len", "32", "--micro-batch", "2", "--steps", "1", "--warmup", "0"]
    rows = bench_step.main([*args, "--optim", "adafactor", "adamw", "--data", str(sample_tokens)])
    assert [r["optimizer"] for r in rows] == ["adamw", "adafactor"]
    rows = bench_step.main([*args, "--optim", "adafactor", "--data", str(sample_tokens)])
    out = capsys.readouterr().out
    assert "| vs adafactor | optimizer |" in out and "| 1.000x | adafactor |" in out


GiB = 2**30


def test_bench_engines_ddp_zero_and_lomo_rows_follow_the_docstring_formulas() -> None:
    """DDP at W > 1 adds its gradient buckets (a copy of every gradient); ZeRO-1 keeps all gradients, ZeRO-2 a
    chunk, both + the bucket; the LOMO way holds the largest gradient; adafactor runs fused too; the low-rank rows
    are at rank d/4; fsdp2's transient holds a deferred update direction."""
    table = bench_engines.rows(["tiny"], [2], micro_batch=2, seq_len=64)
    cfg = ModelConfig.from_flavor("tiny")
    with torch.device("meta"):
        model = Transformer(cfg)

    def row(optimizer: str, engine: str, fused: bool = False) -> dict[str, Any]:
        return next(r for r in table if (r["optimizer"], r["engine"], r["fused"]) == (optimizer, engine, fused))

    m = measure(cfg, OptimConfig(name="adamw"), False, 2, 64, "meta", shard_ranks=2)
    w, half = m["weights"], -(-m["weights"] // 2)
    assert row("adamw", "ddp")["grads"] == m["grads_peak"] + w and row("adamw", "ddp")["total"] == m["peak"] + w
    assert row("adamw", "ds-z1")["grads"] == 2 * w and row("adamw", "ds-z2")["grads"] == half + w
    lomo = row("adalomo", "ds-z3-lomo", fused=True)
    assert lomo["grads"] == max(4 * p.numel() for p in model.parameters())
    assert {r["fused"] for r in table if r["optimizer"] == "adafactor"} == {False, True}
    galore = measure(cfg, OptimConfig(name="galore_adamw", scale=0.25, rank=cfg.d_model // 4), False, 2, 64, "meta")
    assert row("galore_adamw", "ddp")["state"] == galore["state"]
    adalomo = OptimConfig(name="adalomo", clip_threshold=1.0, beta2_decay=-0.8)
    fused = measure(cfg, adalomo, True, 2, 64, "meta", shard_ranks=2)
    blocks = {id(p) for p in model.blocks.parameters()}
    root = sum(4 * p.numel() for p in model.parameters() if id(p) not in blocks)
    block = max(sum(4 * p.numel() for p in b.parameters()) for b in model.blocks)
    assert row("adalomo", "fsdp2", fused=True)["transient"] == root + 2 * block + fused["deferred"]


def test_bench_engines_fsdp2_and_lomo_transients_hold_a_deferred_update_direction() -> None:
    """Hand values through per_rank / per_rank_deepspeed: a deferred U (update_norm=global) is transient memory."""
    m = dict(weights=100, grads_peak=0, state=9, state_sharded=7, activations=11, deferred=13, peak=0)
    layout = dict(root=5, head=3, block=2, largest=1)
    fsdp2 = bench_engines.per_rank("fsdp2", 2, True, m, layout)
    assert fsdp2 == dict(weights=50, grads=5, state=7, activations=11, transient=5 + 4 + 13, total=50 + 5 + 7 + 11 + 22)
    lomo = bench_engines.per_rank_deepspeed("ds-z3-lomo", 2, m, layout)
    assert lomo == dict(weights=50, grads=1, state=9, activations=11, transient=4 + 13, total=50 + 1 + 9 + 11 + 17)


def test_bench_engines_table_columns_and_the_80_gb_fit_of_the_per_rank_total(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = dict(flavor="x", micro_batch=2, optimizer="adamw", fused=False, engine="ddp", ranks=2, weights=GiB)
    parts = dict(grads=2 * GiB, state=3 * GiB, activations=4 * GiB, transient=5 * GiB, formula=10 * GiB)
    bench_engines.print_table([base | parts | dict(total=73 * GiB), base | parts | dict(total=71 * GiB)], 64)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == "| x | 2 | adamw | no | ddp | 2 | 1.00 | 2.00 | 3.00 | 4.00 | 5.00 | **73.00** | 10.00 | no |"
    assert lines[-1].endswith("| **71.00** | 10.00 | yes |")  # fits: under 90% of 80 GiB


def test_bench_step_prints_each_figure_in_its_column(capsys: pytest.CaptureFixture[str]) -> None:
    """One row from its raw figures: the step over the unit's, ms (1e3 x s), GiB (2**30 bytes)."""
    r = dict(amortised=0.020, optimizer="galore_adamw", tokens_per_s=12345.6, mfu=0.123, fwd_bwd=0.012, update=0.005)
    r |= dict(data=0.0004, peak=3 * GiB // 2, accounted=2 * GiB, formula=4 * GiB, syncs=0)
    bench_step.print_row(r, 0.016)
    out = capsys.readouterr().out.strip()
    assert out == "| 1.250x | galore_adamw | 12,346 | 12.3% | 20.0 | 12.0 | 5.0 | 0.40 | 1.50 | 2.00 | 4.00 | 0 |"


def test_bench_step_times_steps_per_step_and_splits_the_next_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock that the fake trainer advances: a batch 0.5 s, a step 1 s; forward+backward 2 s, update 3 s."""
    clock = [0.0]

    def batches(first: int) -> Iterator[tuple[int, int]]:
        while True:
            clock[0] += 0.5
            yield 0, 0

    def takes(seconds: float) -> Any:
        return lambda *args: clock.__setitem__(0, clock[0] + seconds)

    trainer: Any = types.SimpleNamespace(
        info=types.SimpleNamespace(device=torch.device("cpu")),
        data=types.SimpleNamespace(batches=batches),
        train_step=takes(1.0),
        set_lr=takes(0.0),
        compute_gradients=takes(2.0),
        apply_update=takes(3.0),
    )
    monkeypatch.setattr(bench_step, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    assert bench_step.time_steps(trainer, 4, 2) == {"step": 1.5, "data": 0.5, "fwd_bwd": 2.0, "update": 3.0}
    assert bench_step.time_steps(trainer, 4, 2, split=False) == {"step": 1.5}


def test_bench_step_runs_the_low_rank_methods_at_a_quarter_of_the_width(sample_tokens: Path, tmp_path: Path) -> None:
    ns = argparse.Namespace(
        flavor="tiny", data=str(sample_tokens), seq_len=32, micro_batch=2, accumulate=1, fused=[], device="cpu",
        compile=False, compile_optim=False,
    )  # fmt: skip
    cfg = bench_step.bench_config(ns, "galore_adamw", tmp_path, gap=7)
    assert (cfg.optim.rank, cfg.optim.update_proj_gap) == (ModelConfig.from_flavor("tiny").d_model // 4, 7)
    assert not cfg.train.fused_update and cfg.train.max_grad_norm == 1.0


def test_bench_optim_refuses_a_rank_0_arm() -> None:
    assert bench_optim.adalomo_arm("qr-3") == ("qr", 3)
    with pytest.raises(argparse.ArgumentTypeError, match="'svd-0' is not METHOD-RANK"):
        bench_optim.adalomo_arm("svd-0")


def test_bench_optim_times_later_steps_in_alternating_turns_with_adamw(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first step (allocation) is apart from the median of the later ones; who steps first alternates."""
    clock = [0.0]
    turns: list[str] = []

    class Timed(torch.optim.Optimizer):
        def __init__(self, params: Any, **kwargs: Any) -> None:
            super().__init__(params, {})
            self.name = "adamw" if kwargs.get("fused") else "opt"

        def step(self, closure: Any = None) -> None:  # type: ignore[override]
            turns.append(self.name)
            clock[0] += 0.5 if self.name == "adamw" else 100.0 if turns.count("opt") == 1 else 1.0

    monkeypatch.setattr(bench_optim, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(torch.optim, "AdamW", Timed)
    first, later, _, adamw = bench_optim.time_single_parameter(Timed, {}, {}, (2, 2), 1, torch.Generator())
    assert (first, later, adamw) == (100.0, 1.0, 0.5)
    assert turns == ["opt", "adamw", "adamw", "opt"]


def test_bench_optim_floor_counts_the_low_rank_matrices_at_their_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The floor column: each low-rank matrix at lowrank_floor's time (here 0.5 s), the rest at their step (2 s)."""
    monkeypatch.setattr(bench_optim, "time_single_parameter", lambda *args: (9.0, 2.0, {}, 1.0))
    monkeypatch.setattr(bench_optim, "lowrank_floor", lambda *args: 0.5)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_flavor("tiny"))
    r = bench_optim.bench(model, OptimConfig(name="galore_adamw", rank=2), 1, torch.Generator())
    assert len(r["bases"]) > 0  # one per low-rank (shape, options) kind
    # GaLore's default lowrank_targets=blocks: the 2-D weights inside the blocks, each counted, not each kind.
    params = dict(model.named_parameters())
    lowrank = sum(1 for name, p in params.items() if name.startswith("blocks.") and p.dim() == 2)
    assert lowrank > len(r["bases"])  # several matrices share a kind: the count matters
    assert r["plain"] == pytest.approx(2.0 * len(params))
    assert r["floor"] == pytest.approx(0.5 * lowrank + 2.0 * (len(params) - lowrank))


def test_bench_optim_table_divides_by_the_adamw_timed_alongside(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hand values: a 2 ms step beside a 1 ms AdamW, a 402 ms SVD step every T = 200 steps (4 ms on average, half
    of it the SVD), a 1 ms floor; an arm's step over AdamW, over nmf-1's reference code's."""

    def fake_bench(model: Any, cfg: OptimConfig, repeats: int, gen: Any, fast: bool = True) -> dict[str, Any]:
        if cfg.name == "adalomo":
            plain, adamw = (0.006, 0.001) if cfg.factorization == "svd" else (0.003, 0.001) if fast else (0.004, 0.002)
            return dict(plain=plain, svd=plain, floor=plain, adamw=adamw, bases=[])
        lowrank = cfg.name == "galore_adamw"
        bases: list[tuple[tuple[int, int], dict[str, Any]]] = [((8, 8), {})] if lowrank else []
        return dict(plain=0.002, svd=0.402 if lowrank else 0.002, floor=0.001, adamw=0.001, bases=bases)

    monkeypatch.setattr(bench_optim, "bench", fake_bench)
    monkeypatch.setattr(bench_optim, "host_overhead", lambda configs: {})
    flags = ["--flavor", "tiny", "--rank", "2", "--ops-flavor", "", "--real-gradients", ""]
    assert bench_optim.main([*flags, "--optims", "adamw", "galore_adamw"]) == 0
    lines = capsys.readouterr().out.splitlines()
    galore = next(line for line in lines if line.startswith("galore_adamw "))
    assert galore.split() == ["galore_adamw", "2", "2.00", "402", "402.00", "4.00", "50.0%", "1.00", "2.00"]
    adamw = next(line for line in lines if line.startswith("adamw (fused) "))
    assert adamw.split()[2:] == ["2", "2.00", "2", "2.00", "2.00", "0.0%", "-", "-"]
    assert bench_optim.main([*flags, "--optims", "adalomo", "--adalomo-arms", "svd-2"]) == 0
    assert "as the arms run): svd-2 3.00\n" in capsys.readouterr().out


def test_bench_optim_prints_every_optimizer_against_fused_adamw():
    """tools/bench_optim.py at a tiny size: a row per optimizer (fast path, compiled, reference code, randomized
    SVD), the op counts, and fewer kernel launches on Adafactor's and AdaMeM's fast paths than on their reference
    code, and fewer again compiled (no timing asserts). AdaLomo's fast path makes more small-vector launches than
    its reference (RMS(U) from the statistics: mv, dot) in exchange for fewer passes over the matrix, so only its
    compiled form is compared."""
    out = run_tool("tools/bench_optim.py", "--flavor", "tiny", "--rank", "8", "--repeats", "1", "--real-gradients", "")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    launches = {}
    for line in lines[lines.index(next(x for x in lines if x.startswith("optimizer") and "ops" in x)) + 1 :]:
        if line.startswith("fused AdamW step"):
            break
        label, counts = line.rsplit(maxsplit=3)[0], line.split()[-3:]
        launches[label.strip()] = int(counts[1])
    for name in ("adafactor", "adafactor+momentum", "adamem"):
        assert launches[name] < launches[f"{name} [reference code]"], launches
    for name in ("adafactor", "adafactor+momentum", "adalomo"):
        assert launches[f"{name} [compiled]"] < launches[name] / 2, launches
    timed = {line.split("  ")[0] for line in lines[lines.index(next(x for x in lines if "step ms" in x)) + 1 :]}
    assert {"adamw (fused)", "galore_adamw [randomized SVD]", "adamem [reference code]", "adalomo [compiled]"} <= timed
    assert "randomized vs exact SVD subspace distance" in out.stdout
    assert "host time per matrix update" in out.stdout and "adalomo [compiled] " in out.stdout


def test_bench_optim_times_adalomo_factorization_arms_against_nmf1():
    """`--optims adalomo --adalomo-arms ...`: only the AdaLomo rows (its fast path, compiled and reference code, and
    one row per arm, which has no fast path), each arm's step time over nmf-1's reference code; a malformed arm is
    refused."""
    out = run_tool(
        "tools/bench_optim.py", "--flavor", "tiny", "--repeats", "1", "--ops-flavor", "", "--real-gradients", "",
        "--optims", "adalomo", "--adalomo-arms", "svd-2", "qr-1",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    timed = [line.split("  ")[0] for line in lines[lines.index(next(x for x in lines if "step ms" in x)) + 1 :]]
    assert timed[:5] == [
        "adalomo",
        "adalomo [compiled]",
        "adalomo [reference code]",
        "adalomo [svd-2]",
        "adalomo [qr-1]",
    ]
    ratios = next(x for x in lines if x.startswith("AdaLomo factorization arms, step time / nmf-1"))
    assert re.search(r": svd-2 \d+\.\d\d, qr-1 \d+\.\d\d$", ratios), ratios
    assert "subspace distance" not in out.stdout  # no low-rank row was timed
    bad = run_tool("tools/bench_optim.py", "--adalomo-arms", "svd2")
    assert bad.returncode == 2 and "'svd2' is not METHOD-RANK" in bad.stderr, bad.stderr


def test_gpu_checks_script_runs_its_stages_at_the_tiny_size(tmp_path):
    """tools/gpu_checks.sh, the prepared script for a lent GPU, on the CPU at the tiny size (GPU_CHECKS_TINY=1): the
    bench_step tables (one micro-batch per step, then accumulated) and a short train.py run land in one report, the
    TensorBoard logs in one archive (without checkpoints: the machine returns few, small files); an unknown stage is
    refused."""
    env = {**os.environ, "GPU_CHECKS_TINY": "1", "PYTHON": sys.executable}
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "tools/gpu_checks.sh", str(out), "steps", "accumulate", "tensorboard"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = (out / "report.md").read_text()
    assert "| 1.000x | adamw |" in report and "| adalomo (fused) |" in report, report
    assert report.count("| 1.000x | adamw |") == 2 and "micro-batch 2 x 2 per step" in report, report
    assert "validation loss:" in report and "(stopped" not in report, report
    with tarfile.open(out / "tensorboard.tar") as tar:
        names = tar.getnames()
    assert any("events.out.tfevents" in n for n in names) and not any("checkpoints" in n for n in names), names
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "report.md", "tensorboard.tar"]
    bad = subprocess.run(
        ["bash", "tools/gpu_checks.sh", str(tmp_path / "bad"), "mfu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "error: unknown stage mfu" in bad.stderr


def test_plot_labels_tell_study_runs_apart(tmp_path):
    from tools.plot_runs import run_labels

    a, b = tmp_path / "runs" / "adamw" / "lr0.001" / "seed0", tmp_path / "runs" / "galore" / "lr0.01" / "seed0"
    assert run_labels([a, b]) == {a: "adamw/lr0.001/seed0", b: "galore/lr0.01/seed0"}  # not seed0 twice
    assert run_labels([a]) == {a: "seed0"}


def test_model_info_without_a_config_prints_its_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["--help"]):
        assert model_info.main(argv) == 2
        assert capsys.readouterr().out.startswith("Parameter counts, FLOPs per token and optimizer state bytes")


def test_model_info_with_lora_adapters_counts_them_and_their_training_flops(capsys: pytest.CaptureFixture[str]) -> None:
    """configs/tiny.yaml: d 128, 4 layers, MLP hidden 512, fused qkv (128 -> 384), 250 steps x 8 x 256. Rank-4
    adapters on each block linear add 4 * (in + out) each: 4 * (512 + 256 + 640 + 640) = 8192 a layer; the frozen
    weights (4 * (3 + 1 + 4 + 4) * 128^2 = 786,432) lose their weight gradient (2 FLOPs each) and the adapters
    cost 6 each: 30,972,672 - 2 * 786,432 + 6 * 32,768 FLOPs per token."""
    assert model_info.main(["configs/tiny.yaml", "--adapter.method=lora", "--adapter.rank=4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  FLOPs/token +30,972,672 ", out, re.M), out
    assert re.search(r"^  training +29,596,416 FLOPs/token$", out, re.M), out
    assert re.search(r"^  run budget +512,000 tokens ", out, re.M), out  # 250 * 8 * 256
    assert re.search(r"^  lora adapters +32,768  \(rank 4 on every linear of the blocks\)$", out, re.M), out
    assert re.search(r"^  frozen +786,432 ", out, re.M), out
    assert re.search(r"^  trainable +8,258,688 ", out, re.M), out  # 9,012,352 - 786,432 + 32,768
    assert [line.split()[0] for line in out.splitlines()[-4:]] == [
        "adamw",
        "adafactor",
        "adafactor_momentum",
        "adalomo",
    ]


def write_metrics(run: Path, records: list[dict[str, float]]) -> Path:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_plot_runs_final_value_is_at_the_last_step_and_a_run_without_the_metric_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Records out of step order (a resumed run logs again from its checkpoint): the final value is the highest step's.
    a = write_metrics(
        tmp_path / "a", [{"step": 0, "val/loss": 5.0}, {"step": 10, "val/loss": 4.0}, {"step": 5, "val/loss": 4.5}]
    )
    b = write_metrics(tmp_path / "b", [{"step": 1, "train/loss": 6.0}])
    out = tmp_path / "P.PNG"  # the suffix in any case
    assert plot_runs.main([str(a), str(b), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{a}: final val/loss 4.0000 at step 10\nwrote {out}\n"
    assert captured.err == f"{b}: no val/loss records\n"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
