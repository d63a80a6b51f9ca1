"""The shipped sweep files (configs/sweeps/*.yaml): every run of every file passes config validation,
each file's header states its run count and its own command, configs/sweeps/README.md lists them all
with the same counts, and the grids hold what they claim to reproduce (Figure 3's constant tokens,
the GaLore and AdaLomo ablation plans' values)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.runs import REPO
from trainer.config import Config, load_config, validate
from trainer.sweep import SweepRun, sweep_runs

SWEEPS = REPO / "configs" / "sweeps"
SHIPPED = sorted(SWEEPS.glob("*.yaml"))


@functools.cache
def runs_of(name: str) -> list[SweepRun]:
    """The runs of configs/sweeps/<name>.yaml, expanded (and each validated) once per session."""
    return sweep_runs(SWEEPS / f"{name}.yaml")


def configs_of(name: str) -> list[Config]:
    return [run.config for run in runs_of(name)]


def header_runs(path: Path) -> int:
    found = re.search(r"^# Runs: (\d+)\b", path.read_text(), re.MULTILINE)
    assert found, f"{path.name}: the header must say '# Runs: N = ...'"
    return int(found.group(1))


def test_there_are_shipped_sweeps():
    assert len(SHIPPED) >= 20


@pytest.mark.parametrize("sweep", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_sweep_expands_into_the_runs_its_header_counts(sweep):
    runs = runs_of(sweep.stem)  # raises ConfigError on any invalid run
    assert len(runs) == header_runs(sweep)
    assert f"python tools/sweep.py configs/sweeps/{sweep.name}" in sweep.read_text()
    run_dirs = [run.config.run.dir for run in runs]
    assert len(set(run_dirs)) == len(run_dirs), sweep


@pytest.mark.parametrize("sweep", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_run_also_loads_on_the_eight_ranks_of_the_documented_launcher(sweep):
    """configs/sweeps/README.md runs them with --launcher "torchrun --nproc_per_node=8": the cross-key checks
    that depend on the rank count (batch splits, engines, GaLore's projected backward) must pass there too."""
    for run in runs_of(sweep.stem):
        validate(run.config, world_size=8)


def test_the_readme_lists_every_sweep_with_its_run_count():
    rows = re.findall(r"^\| `(\w+\.yaml)` \|.*\| (\d+) \|", (SWEEPS / "README.md").read_text(), re.MULTILINE)
    assert sorted(name for name, _ in rows) == [p.name for p in SHIPPED]
    assert {name: int(n) for name, n in rows} == {p.name: header_runs(p) for p in SHIPPED}


def test_figure3_keeps_tokens_constant_and_scales_the_schedule_with_the_batch():
    """Reference: configs/210m.yaml (batch 1024, 8000 steps, 2500 warmup, eval every 500, save every 1000)."""
    ref = load_config(REPO / "configs/210m.yaml")
    tokens = ref.train.global_batch * ref.train.max_steps * ref.data.seq_len
    cfgs = configs_of("210m_batch_size")
    assert {c.train.global_batch for c in cfgs} == {64, 128, 256, 512, 1024, 2048}
    assert {c.optim.name for c in cfgs} == {"adamw", "adafactor", "adamem"}
    assert {(c.optim.name, c.optim.beta1) for c in cfgs if c.optim.name == "adafactor"} == {
        ("adafactor", None),
        ("adafactor", 0.9),
    }
    for c in cfgs:
        ratio = ref.train.global_batch / c.train.global_batch  # steps scale by this
        assert c.train.global_batch * c.train.max_steps * c.data.seq_len == tokens
        assert c.scheduler.warmup_steps == ref.scheduler.warmup_steps * ratio
        assert c.eval.interval == ref.eval.interval * ratio
        assert c.checkpoint.interval == ref.checkpoint.interval * ratio
        assert c.train.global_batch % c.train.micro_batch == 0
    # an lr sweep at every (optimizer, batch): the same 5 learning rates
    lrs: dict[tuple, set[float]] = {}
    for c in cfgs:  # (optimizer, its momentum, batch): Adafactor twice, without and with momentum
        lrs.setdefault((c.optim.name, c.optim.beta1, c.train.global_batch), set()).add(c.optim.lr)
    assert len(lrs) == 4 * 6 and all(len(v) == 5 for v in lrs.values())
    assert cfgs[0].train.max_steps == 128000 and cfgs[0].scheduler.warmup_steps == 40000  # batch 64


METHOD = {("galore_adamw", "none"), ("adamw", "lora"), ("adamw", "none")}  # GaLore, LoRA (Adam), full rank (Adam)
# (sweep, what a run's config says about its arm, the arms the plan / the figure asks for)
ARMS: list[tuple[str, Callable[[Config], object], set]] = [
    ("llama_60m_galore_rank", lambda c: c.optim.rank, {4, 8, 16, 32, 64}),
    ("llama_60m_galore_update_gap", lambda c: c.optim.update_proj_gap, {50, 200, 500, 1000}),
    ("llama_60m_galore_scale", lambda c: c.optim.scale, {0.1, 0.5, 1.0, 2.0, 4.0}),
    ("llama_60m_galore_projections", lambda c: c.optim.proj_type, {"std", "full"}),
    ("llama_60m_methods", lambda c: (c.optim.name, c.adapter.method), METHOD),
    ("llama_130m_methods", lambda c: (c.optim.name, c.adapter.method), METHOD),
    ("210m_adamem_base_momentum", lambda c: c.optim.lowrank_base_momentum, {True, False}),
    ("550m_adamem_base_momentum", lambda c: c.optim.lowrank_base_momentum, {True, False}),
    ("210m_galore_all", lambda c: (c.optim.name, c.optim.lowrank_targets), {("galore_adamw", "all")}),
    ("210m_adamem_all", lambda c: (c.optim.name, c.optim.lowrank_targets), {("adamem", "all")}),
    ("210m_adamem_variants", lambda c: c.optim.variant, {"variant1", "variant2"}),
    ("550m_adamem_variants", lambda c: c.optim.variant, {"variant1", "variant2"}),
    (
        "210m_adalomo_lr",
        lambda c: (c.optim.name, c.optim.lr),
        {("adalomo", lr) for lr in (1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1)},
    ),
]


@pytest.mark.parametrize("name,arm,expected", ARMS, ids=[row[0] for row in ARMS])
def test_each_grid_holds_the_arms_it_reproduces(name, arm, expected):
    assert {arm(c) for c in configs_of(name)} == expected


def test_the_galore_ablations_run_in_galores_llama_setup_and_vary_one_factor_from_its_reference():
    """GaLore's LLaMA-60M C4 script: seq 256, batch 512, 10k steps, 1k warmup, wd 0, lr .01, alpha .25, r 128, T 200."""
    ref = load_config(REPO / "configs/galore/ablations/60m_galore.yaml")
    assert (ref.model.flavor, ref.data.seq_len, ref.train.global_batch) == ("llama_60m", 256, 512)
    assert (ref.train.max_steps, ref.scheduler.warmup_steps, ref.optim.weight_decay) == (10000, 1000, 0.0)
    assert (ref.optim.lr, ref.optim.scale, ref.optim.rank, ref.optim.update_proj_gap) == (1e-2, 0.25, 128, 200)
    for name, key in [
        ("llama_60m_galore_rank", "rank"),
        ("llama_60m_galore_update_gap", "update_proj_gap"),
        ("llama_60m_galore_scale", "scale"),
        ("llama_60m_galore_projections", "proj_type"),
    ]:
        for c in configs_of(name):
            changed = {
                k
                for k in ("rank", "update_proj_gap", "scale", "proj_type")
                if getattr(c.optim, k) != getattr(ref.optim, k)
            }
            assert changed <= {key}, (name, changed)
            assert c.train == ref.train and c.model == ref.model and c.scheduler == ref.scheduler
