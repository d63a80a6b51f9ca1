"""train.engine=deepspeed on 2 CPU ranks (gloo): AdamW at ZeRO-1/2/3 (and offloaded) and AdaLomo under
ZeRO-3 the LOMO way train like one process; DeepSpeed's checkpoints resume exactly on the same ranks; the
DeepSpeed JSON is built from the config, a user's file merged and checked; every refusal says why."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from tests.helpers.gloo import run_ranks
from tests.helpers.runs import assert_identical_runs, follows_reference, run, tiny_overrides, train_as_rank
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, deepspeed_config, load_config
from trainer.deepspeed_engine import DeepSpeedCheckpoints, GatheredModelState, StepInDeepSpeed, copy_own_slice
from trainer.dist_checkpoint import read_extras
from trainer.distributed import DistInfo

STEPS = 4
COMMON = {"train.max_steps": STEPS, "checkpoint.interval": 2, "eval.interval": 2, "train.micro_batch": 1}
CASES: dict[str, dict[str, object]] = {
    "adamw_zero1": {"optim.name": "adamw", "train.zero_stage": 1},
    "adamw_zero2": {"optim.name": "adamw", "train.zero_stage": 2},
    "adamw_zero3": {"optim.name": "adamw", "train.zero_stage": 3},
    "adamw_zero2_offload": {"optim.name": "adamw", "train.zero_stage": 2, "train.offload_optimizer": True},
    "adalomo_zero3": {
        "optim.name": "adalomo",
        "train.zero_stage": 3,
        "train.fused_update": True,
        "train.max_grad_norm": 0,
    },
}
# The one-process reference of each case: the same optimizer settings without the DeepSpeed keys.
DS_KEYS = ("train.zero_stage", "train.offload_optimizer")


def _deepspeed_jobs_on_ranks(rank: int, world: int, jobs: list[tuple[str, list[str]]]) -> None:
    """Several trainer runs in one process: DeepSpeed caches the process groups of the first in module
    globals, which a run starts afresh (torchrun runs one per process); reloading the module resets them."""
    import importlib

    import deepspeed.utils.groups

    for store, overrides in jobs:
        importlib.reload(deepspeed.utils.groups)
        train_as_rank(rank, world, store, overrides)


def _reference(extra: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in extra.items() if k not in DS_KEYS}


def test_deepspeed_on_two_ranks_trains_like_one_process_and_resumes_exactly(tmp_path, sample_tokens):
    next_store = (str(tmp_path / f"store{i}") for i in itertools.count()).__next__
    jobs = []
    for name, extra in CASES.items():
        overrides = tiny_overrides(tmp_path / f"ds_{name}", sample_tokens, **COMMON, **extra)
        jobs.append((next_store(), [*overrides, "--train.engine=deepspeed"]))
    # 2 -> 2 from DeepSpeed's own checkpoint (ZeRO-3 partitions of AdamW) and from AdaLomo's gathered file:
    # stopped at step 2 and started again, the same bits as without the stop.
    for name in ("adamw_zero3", "adalomo_zero3"):
        overrides = [*tiny_overrides(tmp_path / f"stop_{name}", sample_tokens, **COMMON, **CASES[name])]
        overrides.append("--train.engine=deepspeed")
        jobs += [(next_store(), [*overrides, "--train.max_steps=2"]), (next_store(), overrides)]
    # AdaLomo's single files cross rank counts: 1 -> 2 (one process to step 2, two ZeRO-3 ranks on) and
    # 2 -> 1 (two ranks to step 2; one process on, below).
    lomo = {**COMMON, **CASES["adalomo_zero3"]}
    run(tmp_path, sample_tokens, "one_then_two", **{**_reference(lomo), "train.max_steps": 2})
    jobs.append(
        (next_store(), [*tiny_overrides(tmp_path / "one_then_two", sample_tokens, **lomo), "--train.engine=deepspeed"])
    )
    two_then_one = tiny_overrides(tmp_path / "two_then_one", sample_tokens, **lomo)
    jobs.append((next_store(), [*two_then_one, "--train.engine=deepspeed", "--train.max_steps=2"]))
    run_ranks(_deepspeed_jobs_on_ranks, 2, jobs)

    figures = {}
    for name, extra in CASES.items():
        run(tmp_path, sample_tokens, f"one_{name}", **COMMON, **_reference(extra))
        figures[name] = follows_reference(tmp_path / f"ds_{name}", tmp_path / f"one_{name}", STEPS)
    print("max relative parameter difference, 2 deepspeed ranks vs 1 process:", figures)
    # As under fsdp2 (tests/trainer/test_engines.py): fp32 summation order, amplified by Adam on tiny gradients.
    assert max(figures.values()) < 5e-5, figures
    assert figures["adalomo_zero3"] < 2e-6, figures

    stage3 = tmp_path / "stop_adamw_zero3" / "checkpoints" / "step_00000002"
    assert read_extras(stage3)["layout"] == "deepspeed"  # DeepSpeed wrote each rank's partitions:
    assert (stage3 / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    assert (tmp_path / "stop_adalomo_zero3" / "checkpoints" / "step_00000002.pt").is_file()  # gathered single file
    for name in ("adamw_zero3", "adalomo_zero3"):
        assert_identical_runs(tmp_path / f"stop_{name}", tmp_path / f"ds_{name}", STEPS)

    run(tmp_path, sample_tokens, "two_then_one", **_reference(lomo))
    for resumed in ("one_then_two", "two_then_one"):
        moved = follows_reference(tmp_path / resumed, tmp_path / "one_adalomo_zero3", STEPS)
        print(f"AdaLomo {resumed} vs one process, max relative parameter difference: {moved:.1e}")
        assert moved < 2e-6, resumed


def _config(*overrides: str, world: int = 2):
    cfg = load_config("configs/tiny.yaml", ["--train.global_batch=8", "--train.micro_batch=2", *overrides])
    return deepspeed_config(cfg, world)


def test_the_deepspeed_json_is_built_from_the_config_and_a_users_file_merged(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    built = _config("--train.engine=deepspeed", "--train.zero_stage=3", "--train.max_grad_norm=0.5")
    assert built["train_batch_size"] == 8 and built["train_micro_batch_size_per_gpu"] == 2
    assert built["gradient_accumulation_steps"] == 2  # 4 sequences per rank in micro-batches of 2
    assert built["gradient_clipping"] == 0.5 and built["zero_optimization"] == {"stage": 3}
    assert built["managed_gradient_accumulation"] is False  # the trainer accumulates; engine.step() is the boundary
    assert "optimizer" not in built and "bf16" not in built  # the client optimizer; fp32 weights + our autocast
    # torch's AdamW is the client optimizer: DeepSpeed must take it untested, and not swap in DeepSpeedCPUAdam
    assert built["zero_allow_untested_optimizer"] is True and built["zero_force_ds_cpu_optimizer"] is False
    offload = _config("--train.engine=deepspeed", "--train.offload_optimizer=true")
    assert offload["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}, "prescale_gradients": True})
    )
    merged = _config("--train.engine=deepspeed", f"--train.deepspeed_config={user}")
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000} and merged["prescale_gradients"]


def test_max_grad_norm_0_turns_deepspeeds_clipping_off(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # DeepSpeed reads gradient_clipping=0 as no clipping, like the trainer
    assert _config("--train.engine=deepspeed", "--train.max_grad_norm=0")["gradient_clipping"] == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"optimizer": {"type": "Adam"}}', "the optimizer is optim.name's"),
        ('{"bf16": {"enabled": true}}', "parameters stay fp32"),
        ('{"fp16": {"enabled": true}}', "sets 'fp16': parameters stay fp32"),
        ('{"torch_autocast": {"enabled": true}}', "sets 'torch_autocast': bf16 compute is --train.precision=bf16"),
        ('{"scheduler": {"type": "WarmupLR"}}', r"sets 'scheduler': the learning-rate schedule is the trainer's"),
        (b'{"a": "\xff"}', "not valid JSON"),  # not UTF-8
        ('{"zero_optimization": 3}', r"zero_optimization=3, but this run's config gives \{'stage': 2\}"),
        ('{"zero_optimization": {"stage": 3}}', r"zero_optimization.stage=3.*gives 2.*train.zero_stage"),
        ('{"train_batch_size": 16}', r"train_batch_size=16.*train.global_batch"),
    ],
)
def test_a_bad_deepspeed_config_file_is_refused_at_config_load(tmp_path, monkeypatch, content, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tmp_path / "ds.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        _config("--train.engine=deepspeed", f"--train.deepspeed_config={path}")


@pytest.mark.parametrize(
    ("zero", "flags", "message"),
    [
        ({"offload_optimizer": {"device": "cpu"}}, [], r"offload_optimizer=.*train.offload_optimizer=false"),
        ({"offload_optimizer": {"device": "nvme"}}, ["--train.offload_optimizer=true"], r"offload_optimizer.device"),
        ({"compute_grad_norm": False}, [], "compute_grad_norm=false: the trainer logs and checks"),
        ({"overlap_comm": True}, ["--train.zero_stage=1"], r"overlap_comm=true.*--train.zero_stage=2"),
    ],
)
def test_zero_keys_that_would_change_the_run_behind_the_config_are_refused(tmp_path, monkeypatch, zero, flags, message):
    # Keys the built config leaves out, but that would switch on offload (the run headers, memory tables and
    # resume checks read train.offload_optimizer), drop the gradient norm, or fail inside deepspeed.initialize.
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    with pytest.raises(ConfigError, match=message):
        _config("--train.engine=deepspeed", f"--train.deepspeed_config={path}", *flags)


@pytest.mark.parametrize(
    ("zero", "flags"),
    [
        ({"offload_optimizer": {"device": "none"}}, []),
        ({"offload_optimizer": {}}, []),  # DeepSpeed's default device is "none": no offload
        ({"offload_optimizer": {"device": "cpu", "pin_memory": True}}, ["--train.offload_optimizer=true"]),
        ({"overlap_comm": True, "compute_grad_norm": True}, []),  # stage 2
        ({"overlap_comm": False}, ["--train.zero_stage=1"]),
    ],
)
def test_zero_keys_that_agree_with_the_config_are_merged(tmp_path, monkeypatch, zero, flags):
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    merged = _config("--train.engine=deepspeed", f"--train.deepspeed_config={path}", *flags)
    assert all(merged["zero_optimization"][k] == v for k, v in zero.items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--optim.name=galore_adamw"], "SVD of a partition is meaningless"),
        (["--optim.name=adalomo", "--train.fused_update=true", "--train.max_grad_norm=0"], "zero_stage=3"),
        (["--optim.name=adalomo", "--train.zero_stage=3"], "train.fused_update=true"),
        (
            ["--optim.name=adalomo", "--train.zero_stage=3", "--train.fused_update=true", "--train.max_grad_norm=0"]
            + ["--optim.update_norm=layerwise"],
            "re-partitioned",
        ),
        (["--train.fused_update=true", "--train.max_grad_norm=0"], "steps after backward"),
        (["--adapter.method=lora"], "run on ddp"),
        (
            ["--optim.name=adalomo", "--train.zero_stage=3", "--train.fused_update=true", "--train.max_grad_norm=0"]
            + ["--train.offload_optimizer=true"],
            r"train\.offload_optimizer=true with optim\.name=adalomo: DeepSpeed holds no optimizer state",
        ),
    ],
)
def test_unsupported_deepspeed_combinations_are_refused_at_config_load(overrides, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", ["--train.global_batch=8", "--train.engine=deepspeed", *overrides])


@pytest.mark.parametrize("update_norm", ["grouped", "none"])
def test_adalomo_the_lomo_way_accepts_grouped_and_no_update_norm(update_norm: str, monkeypatch: pytest.MonkeyPatch):
    """Both need no other tensor's gradient, so each is updated in its own hook before DeepSpeed re-partitions."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    lomo = ["--optim.name=adalomo", "--train.zero_stage=3", "--train.fused_update=true", "--train.max_grad_norm=0"]
    overrides = ["--train.global_batch=8", "--train.engine=deepspeed", *lomo, f"--optim.update_norm={update_norm}"]
    cfg = load_config("configs/tiny.yaml", overrides)
    assert (cfg.train.engine, cfg.optim.name, cfg.optim.update_norm) == ("deepspeed", "adalomo", update_norm)


@pytest.mark.parametrize(
    "overrides", [["--train.offload_optimizer=true"], ["--train.deepspeed_config=ds.json"]], ids=["offload", "json"]
)
def test_deepspeed_keys_under_another_engine_are_refused(overrides):
    with pytest.raises(ConfigError, match="applies to train.engine=deepspeed"):
        load_config("configs/tiny.yaml", ["--train.engine=fsdp2", *overrides])


def test_a_deepspeed_checkpoint_resumes_only_on_its_engine_ranks_and_stage(tmp_path):
    directory = tmp_path / "checkpoints" / "step_00000002"
    directory.mkdir(parents=True)
    state = {"layout": "deepspeed", "world_size": 2, "config": {"train": {"zero_stage": 3}}}
    fits: dict[str, Any] = dict(engine="deepspeed", world_size=2, layout="deepspeed", zero_stage=3)
    ckpt.check_checkpoint_fits(state, directory, **fits)  # the same setup: fine
    changes: list[tuple[dict[str, Any], str]] = [
        ({"engine": "fsdp2", "layout": "dcp"}, "resume only there"),
        ({"world_size": 4}, "on 2 ranks"),
        ({"zero_stage": 2}, "--train.zero_stage=3"),
    ]
    for change, message in changes:
        with pytest.raises(ckpt.CheckpointError, match=message):
            ckpt.check_checkpoint_fits(state, directory, **{**fits, **change})
    single = tmp_path / "step_00000002.pt"
    with pytest.raises(ckpt.CheckpointError, match="ZeRO optimizer cannot load it"):
        ckpt.check_checkpoint_fits({}, single, **fits)
    with pytest.raises(ckpt.CheckpointError, match="reads single files"):
        ckpt.check_checkpoint_fits({"layout": "dcp"}, directory, **{**fits, "layout": "gathered"})
    ckpt.check_checkpoint_fits({}, single, **{**fits, "layout": "gathered"})  # AdaLomo's files go anywhere


class _FakeEngine:
    """What StepInDeepSpeed and DeepSpeedCheckpoints call on DeepSpeed's engine, with set answers."""

    def __init__(self, norm: Any = None, load_path: str | None = None):
        self.norm, self.load_path, self.steps = norm, load_path, 0

    def step(self) -> None:
        self.steps += 1

    def get_global_grad_norm(self) -> Any:
        return self.norm

    def load_checkpoint(self, load_dir: str, **kwargs: Any) -> tuple[str | None, dict]:
        return self.load_path, {}


def test_a_missing_deepspeed_gradient_norm_names_the_key_and_a_float_norm_becomes_a_tensor():
    client = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(RuntimeError, match=r"compute_grad_norm=false in train\.deepspeed_config\?\); remove that key"):
        StepInDeepSpeed(_FakeEngine(norm=None), client).finish_backward()
    engine = _FakeEngine(norm=2.5)
    norm = StepInDeepSpeed(engine, client).finish_backward()
    assert engine.steps == 1 and torch.is_tensor(norm) and norm.item() == 2.5


def test_a_deepspeed_checkpoint_without_model_states_is_refused(tmp_path: Path):
    directory = tmp_path / "step_00000002"
    directory.mkdir()
    (directory / "extras.pt").write_bytes(b"")
    info = DistInfo(0, 2, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"DeepSpeed found no model states in it \(\['extras\.pt'\]\)"):
        DeepSpeedCheckpoints(_FakeEngine(load_path=None), info).load(directory)
    DeepSpeedCheckpoints(_FakeEngine(load_path=str(directory)), info).load(directory)  # found: no error


@pytest.mark.parametrize(("rank", "expected"), [(0, [0.0, 1.0]), (1, [2.0, 3.0]), (2, [4.0, 0.0]), (3, [0.0, 0.0])])
def test_each_rank_keeps_its_flat_slice_of_a_zero3_parameter(rank: int, expected: list[float]):
    """5 elements over 4 ranks: ZeRO-3 partitions of ceil(5 / 4) = 2, the third padded, the fourth empty."""
    p = SimpleNamespace(ds_tensor=torch.zeros(2), ds_numel=5)
    copy_own_slice(p, torch.arange(5.0), rank)
    assert p.ds_tensor.tolist() == expected


def _zero3_linear(world: int) -> nn.Linear:
    """An nn.Linear(3, 2) whose parameters carry ZeRO-3's partition attributes (full values kept, for the test)."""
    model = nn.Linear(3, 2)
    for p in model.parameters():
        size = -(-p.numel() // world)
        p.ds_shape, p.ds_numel, p.ds_tensor = p.shape, p.numel(), torch.zeros(size)  # type: ignore[attr-defined]
    return model


def test_a_gathered_checkpoint_loads_each_ranks_slice_and_refuses_a_mismatch():
    model = _zero3_linear(world=2)
    info = DistInfo(1, 2, 1, torch.device("cpu"))
    weight, bias = torch.arange(6.0).reshape(2, 3), torch.tensor([10.0, 11.0])
    GatheredModelState(model, info).load_state_dict({"weight": weight, "bias": bias})
    assert model.weight.ds_tensor.tolist() == [3.0, 4.0, 5.0]  # type: ignore[attr-defined]
    assert model.bias.ds_tensor.tolist() == [11.0]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"weight: the checkpoint has shape \(3, 2\), the model \(2, 3\)"):
        GatheredModelState(model, info).load_state_dict({"weight": weight.T.contiguous(), "bias": bias})
    with pytest.raises(ValueError, match=r"missing \['bias'\], unexpected \[\]"):
        GatheredModelState(model, info).load_state_dict({"weight": weight})
