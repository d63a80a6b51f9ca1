"""The shipped study files (configs/studies/*.yaml): each loads (every run's config valid, every figure
naming existing entries), states its run count and command in its header, configs/studies/README.md lists
it with the same count, and the paper studies take the sweep files' runs as they are (so tools/sweep.py
runs count as done), with each optimizer of a mixed sweep as its own entry."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from study.spec import Study, load_study
from tests.helpers.runs import REPO
from trainer.config import validate
from trainer.sweep import sweep_runs

STUDIES = REPO / "configs" / "studies"
SHIPPED = sorted(STUDIES.glob("*.yaml"))
SWEEPS = REPO / "configs" / "sweeps"


@functools.cache
def study_of(name: str) -> Study:
    """configs/studies/<name>.yaml, loaded (and every run validated) once per session."""
    return load_study(STUDIES / f"{name}.yaml")


def header_runs(path: Path) -> int:
    found = re.search(r"^# Runs: (\d+)\b", path.read_text(), re.MULTILINE)
    assert found, f"{path.name}: the header must say '# Runs: N = ...'"
    return int(found.group(1))


def test_the_paper_studies_are_shipped():
    assert {"210m", "550m", "llama_130m_table1"} <= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.stem != "mini"], ids=lambda p: p.stem)
def test_every_run_of_a_gpu_study_also_loads_on_the_eight_ranks_of_the_documented_launcher(path):
    """configs/studies/README.md runs them with --launcher "torchrun --nproc_per_node=8": the checks that depend on
    the rank count (batch splits, engines, GaLore's projected backward) must pass there, or those runs fail."""
    for run in study_of(path.stem).runs:
        validate(run.config, world_size=8)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_study_loads_into_the_runs_its_header_counts(path):
    study = study_of(path.stem)  # raises ConfigError on any invalid run, entry or figure
    assert len(study.runs) == header_runs(path)
    assert f"python tools/study.py configs/studies/{path.name}" in path.read_text()


def test_the_readme_lists_every_study_with_its_run_count():
    rows = re.findall(r"^\| `(\w+\.yaml)` \|.*\| (\d+) \|", (STUDIES / "README.md").read_text(), re.MULTILINE)
    assert sorted(name for name, _ in rows) == [p.name for p in SHIPPED]
    assert {name: int(n) for name, n in rows} == {p.name: header_runs(p) for p in SHIPPED}


def runs_by_dir(study: Study, entries: list[str]) -> dict[str, list[str]]:
    return {str(run.run_dir): run.overrides for run in study.runs if run.entry in entries}


@pytest.mark.parametrize(
    "study,sweep,entries",
    [
        ("210m", "210m_adafactor_lr", ["Adafactor", "Adafactor+momentum"]),
        ("210m", "210m_adamem_variants", ["AdaMeM variant 1", "AdaMeM variant 2"]),
        ("210m", "210m_batch_size", ["Fig3 AdamW", "Fig3 Adafactor", "Fig3 Adafactor+momentum", "Fig3 AdaMeM r128"]),
        ("550m", "550m_adafactor_lr", ["Adafactor", "Adafactor+momentum"]),
        ("llama_130m_table1", "galore_table1", ["Adam", "GaLore"]),
    ],
)
def test_entries_split_from_a_mixed_sweep_hold_exactly_its_runs(study, sweep, entries):
    expected = {
        run.overrides[-1].removeprefix("--run.dir="): run.overrides for run in sweep_runs(SWEEPS / f"{sweep}.yaml")
    }
    assert runs_by_dir(study_of(study), entries) == expected


def test_the_210m_study_has_the_papers_arms_and_tuned_keys():
    study = study_of("210m")
    arms: dict[str, set] = {}
    for run in study.runs:
        arms.setdefault(run.arm, set()).add(tuple(sorted(run.tuned)))
    assert {a for a in arms if a.startswith("GaLore 210m")} == {f"GaLore 210m_galore_r{r}" for r in (64, 128, 256, 512)}
    assert arms["GaLore 210m_galore_r64"] == {("optim.lr", "optim.scale")}  # alpha tuned with lr
    assert arms["AdaMeM 210m_adamem_r64"] == {("optim.delta", "optim.lr")}
    assert arms["AdamW"] == {("optim.lr",)}
    # Figure 3: one arm per optimizer and batch size, tuned over the lr alone
    fig3 = [a for a in arms if a.startswith("Fig3 ")]
    assert len(fig3) == 4 * 6 and "Fig3 AdaMeM r128 global_batch=2048" in fig3
    figures = {f.name: f for f in study.figures}
    fig1 = figures["fig1_left_galore"]
    assert (fig1.x, fig1.series) == ("optim.rank", ["GaLore"])
    assert fig1.references == {"Adafactor": ["Adafactor"], "Adamw(factor)": ["AdamW", "Adafactor+momentum"]}
    assert figures["fig3_batch"].x == "train.global_batch"
    assert {f.kind for f in study.figures} == {"line", "curves", "pareto"}


def test_table1_has_a_row_per_optimizer_and_a_column_per_beta2():
    study = study_of("llama_130m_table1")
    (table,) = [f for f in study.figures if f.kind == "table"]
    assert (table.rows, table.columns) == (["Adam", "GaLore"], "optim.beta2")
    assert sorted(run.arm for run in study.runs) == [
        "Adam beta2=0.95",
        "Adam beta2=0.999",
        "GaLore beta2=0.95",
        "GaLore beta2=0.999",
    ]
