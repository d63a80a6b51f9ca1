"""The study file (study/spec.py): entries -> runs in order, with their overrides, run directories, arms,
tuned values and seeds; figures; and every malformed file a ConfigError naming the file, the entry or
figure and the fix. Every study here is on configs/tiny.yaml, so loading one takes milliseconds."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from study.spec import Study, config_value, load_study
from tests.helpers.runs import REPO
from trainer.config import ConfigError, load_config, section_classes
from trainer.sweep import expand_sweep

TINY = REPO / "configs" / "tiny.yaml"


def write_study(tmp_path: Path, body: str, name: str = "s.yaml") -> Path:
    """A study file in tmp_path whose default config is configs/tiny.yaml."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"config: {TINY}\n" + body)
    return path


def load(tmp_path: Path, body: str) -> Study:
    return load_study(write_study(tmp_path, body))


@pytest.fixture(autouse=True)
def tiny_copy(tmp_path: Path) -> None:
    """tmp_path/configs/tiny_copy.yaml: a second config file (configs/tiny.yaml again), for multi-config entries."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_copy.yaml").write_text(f"base: {TINY}\n")


TWO_ENTRIES = """\
overrides: {train.max_steps: 7, train.global_batch: 8}
arms:
  - label: AdamW
    overrides: {optim.name: adamw, train.max_steps: 9}
    grid: {optim.lr: [1.0e-3, 3.0e-3]}
  - label: GaLore
    overrides: {optim.name: galore_adamw}
    grid: {optim.rank: [8, 16], optim.lr: [1.0e-2, 3.0e-2]}
"""


def test_inline_entries_expand_in_file_order_with_the_study_overrides_under_their_own(tmp_path):
    study = load(tmp_path, TWO_ENTRIES)
    assert (study.name, study.out, study.entries, study.seeds) == ("s", Path("runs/studies/s"), ["AdamW", "GaLore"], [])
    assert [(r.entry, r.config.optim.rank if r.entry == "GaLore" else None, r.config.optim.lr) for r in study.runs] == [
        ("AdamW", None, 1e-3),
        ("AdamW", None, 3e-3),
        ("GaLore", 8, 1e-2),  # the last grid key varies fastest, as in a sweep file
        ("GaLore", 8, 3e-2),
        ("GaLore", 16, 1e-2),
        ("GaLore", 16, 3e-2),
    ]
    first = study.runs[0]
    assert first.config_path == TINY
    # the study's overrides, the entry's (its max_steps wins), the grid point, then the run directory
    assert first.overrides == [
        "--train.max_steps=9",
        "--train.global_batch=8",
        "--optim.name=adamw",
        "--optim.lr=0.001",
        "--run.dir=runs/studies/s/runs/adamw/lr0.001",
    ]
    assert (first.config.train.max_steps, first.config.train.global_batch) == (9, 8)
    assert study.runs[2].config.train.max_steps == 7
    assert study.runs[2].config.optim.name == "galore_adamw"


def test_default_run_dirs_name_every_varied_key_under_the_labels_slug(tmp_path):
    study = load(
        tmp_path,
        f"""\
out: runs/x
arms:
  - label: GaLore
    overrides: {{optim.name: galore_adamw}}
    grid: {{optim.rank: [8, 16], optim.lr: [1.0e-2]}}
  - label: Adafactor+momentum (b1 .9)
    config: [{TINY}, configs/tiny_copy.yaml]
    zip: {{train.global_batch: [8, 16], train.max_steps: [20, 10]}}
  - label: Plain
""",
    )
    assert [str(run.run_dir) for run in study.runs] == [
        "runs/x/runs/galore/rank8_lr0.01",
        "runs/x/runs/galore/rank16_lr0.01",
        "runs/x/runs/adafactor-momentum-b1-9/tiny_global_batch8",
        "runs/x/runs/adafactor-momentum-b1-9/tiny_global_batch16",
        "runs/x/runs/adafactor-momentum-b1-9/tiny_copy_global_batch8",
        "runs/x/runs/adafactor-momentum-b1-9/tiny_copy_global_batch16",
        "runs/x/runs/plain",
    ]
    assert all(run.overrides[-1] == f"--run.dir={run.run_dir}" for run in study.runs)


def test_arms_group_the_runs_that_differ_only_in_tuned_keys_and_are_named_by_the_rest(tmp_path):
    study = load(
        tmp_path,
        f"""\
arms:
  - label: GaLore
    overrides: {{optim.name: galore_adamw}}
    grid: {{optim.rank: [8, 16], optim.lr: [1.0e-2, 3.0e-2], optim.scale: [0.25, 0.5]}}
    tune: [optim.lr, optim.scale]
  - label: Batch
    config: [{TINY}, configs/tiny_copy.yaml]
    zip: {{train.global_batch: [8, 16], train.max_steps: [20, 10]}}
    grid: {{optim.weight_decay: [0.0, 0.1], optim.lr: [1.0e-3, 3.0e-3]}}
  - label: Seeds
    grid: {{run.seed: [1, 2], data.seed: [3]}}
""",
    )
    arms: dict[str, list] = {}
    for run in study.runs:
        arms.setdefault(run.arm, []).append(run.tuned)
    assert list(arms)[:3] == ["GaLore rank=8", "GaLore rank=16", "Batch tiny global_batch=8 weight_decay=0.0"]
    assert arms["GaLore rank=8"] == [
        {"optim.lr": lr, "optim.scale": scale} for lr in (1e-2, 3e-2) for scale in (0.25, 0.5)
    ]
    # configs x zip rows x untuned grid values; the first zip key names the row; lr is tuned by default
    assert len([a for a in arms if a.startswith("Batch ")]) == 2 * 2 * 2
    assert "Batch tiny_copy global_batch=16 weight_decay=0.1" in arms
    assert arms["Batch tiny global_batch=8 weight_decay=0.0"] == [{"optim.lr": 1e-3}, {"optim.lr": 3e-3}]
    # two varied keys with one last part (seed) are named by their dotted keys; a fixed lr is still shown
    assert [a for a in arms if a.startswith("Seeds")] == [
        "Seeds run.seed=1 data.seed=3",
        "Seeds run.seed=2 data.seed=3",
    ]
    assert arms["Seeds run.seed=1 data.seed=3"] == [{"optim.lr": load_config(TINY).optim.lr}]
    assert [run.seed for run in study.runs if run.entry == "Seeds"] == [1, 2]  # no `seeds`: each run's run.seed


def test_an_untuned_lr_in_the_grid_is_part_of_the_arm(tmp_path):
    study = load(
        tmp_path,
        "arms:\n  - {label: A, grid: {optim.lr: [1.0e-3, 3.0e-3], optim.weight_decay: [0.0, 0.1]},"
        " tune: [optim.weight_decay]}\n",
    )
    assert sorted({run.arm for run in study.runs}) == ["A lr=0.001", "A lr=0.003"]
    assert study.runs[0].tuned == {"optim.weight_decay": 0.0}
    # an lr the entry keeps fixed is shown with the tuned keys even when its `tune` leaves it out
    fixed = load(
        tmp_path, "arms:\n  - {label: B, grid: {optim.weight_decay: [0.0, 0.1]}, tune: [optim.weight_decay]}\n"
    )
    assert fixed.runs[1].tuned == {"optim.weight_decay": 0.1, "optim.lr": load_config(TINY).optim.lr}


def test_the_study_tune_applies_to_the_entries_that_vary_each_key(tmp_path):
    study = load(
        tmp_path,
        """\
tune: [optim.lr, optim.weight_decay]
arms:
  - {label: A, grid: {optim.lr: [1.0e-3, 3.0e-3], optim.weight_decay: [0.0, 0.1]}}
  - {label: B, grid: {optim.lr: [1.0e-3]}}
""",
    )
    assert {run.arm for run in study.runs} == {"A", "B"}
    assert study.runs[1].tuned == {"optim.lr": 1e-3, "optim.weight_decay": 0.1}
    assert study.runs[-1].tuned == {"optim.lr": 1e-3}  # B does not vary weight decay: not tuned there


def test_seeds_repeat_every_run_seed_by_seed_with_their_keys_and_directories(tmp_path):
    body = (
        "seeds: [0, 1]\nseed_keys: [run.seed, data.seed]\narms:\n  - {label: A, grid: {optim.lr: [1.0e-3, 3.0e-3]}}\n"
    )
    body += "  - {label: B, run_dir: runs/b}\n"
    study = load(tmp_path, body)
    assert study.seeds == [0, 1]
    assert [(run.entry, run.seed, run.tuned["optim.lr"]) for run in study.runs] == [
        ("A", 0, 1e-3),
        ("A", 0, 3e-3),
        ("B", 0, load_config(TINY).optim.lr),
        ("A", 1, 1e-3),
        ("A", 1, 3e-3),
        ("B", 1, load_config(TINY).optim.lr),
    ]
    run = study.runs[4]
    assert run.overrides == [
        "--run.seed=1",
        "--data.seed=1",
        "--optim.lr=0.003",
        "--run.dir=runs/studies/s/runs/a/lr0.003/seed1",
    ]
    assert (run.config.run.seed, run.config.data.seed, run.run_dir) == (
        1,
        1,
        Path("runs/studies/s/runs/a/lr0.003/seed1"),
    )
    assert study.runs[5].run_dir == Path("runs/b/seed1")
    assert {run.arm for run in study.runs} == {"A", "B"}  # seeds are replicates of one arm
    # --seeds replaces the file's seeds
    again = load_study(study.path, seeds=[7])
    assert again.seeds == [7] and [run.seed for run in again.runs] == [7, 7, 7]
    assert again.runs[0].run_dir == Path("runs/studies/s/runs/a/lr0.001/seed7")


def test_a_seed_key_other_than_run_seed_still_makes_the_runs_replicate_and_comes_after_the_fixed_overrides(tmp_path):
    body = "seeds: [3]\nseed_keys: [data.seed]\narms:\n"
    study = load(tmp_path, body + "  - {label: A, overrides: {optim.name: adamw}, grid: {optim.lr: [1.0e-3]}}\n")
    (run,) = study.runs
    assert run.overrides == [
        "--optim.name=adamw",
        "--data.seed=3",
        "--optim.lr=0.001",
        "--run.dir=runs/studies/s/runs/a/lr0.001/seed3",
    ]
    # the replicate is the study's seed 3, not the config's run.seed (0, which seed_keys leaves alone)
    assert (run.seed, run.config.data.seed, run.config.run.seed) == (3, 3, 0)


def test_seeds_set_only_run_seed_by_default(tmp_path):
    (run,) = load(tmp_path, "seeds: [3]\narms:\n  - {label: A}\n").runs
    assert run.overrides == ["--run.seed=3", "--run.dir=runs/studies/s/runs/a/seed3"]
    assert (run.config.run.seed, run.config.data.seed) == (3, 1234)  # configs/tiny.yaml's data.seed


def test_the_study_tune_may_name_optim_lr_when_every_entry_keeps_it_fixed(tmp_path):
    study = load(
        tmp_path,
        "tune: [optim.lr, optim.weight_decay]\narms:\n  - {label: A, grid: {optim.weight_decay: [0.0, 0.1]}}\n",
    )
    assert {run.arm for run in study.runs} == {"A"}
    assert [run.tuned for run in study.runs] == [
        {"optim.weight_decay": 0.0, "optim.lr": 3e-3},  # configs/tiny.yaml's lr
        {"optim.weight_decay": 0.1, "optim.lr": 3e-3},
    ]


def test_a_sweep_entry_takes_the_sweep_files_runs_and_directories(tmp_path):
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    sweep = sweeps / "lr.yaml"
    sweep.write_text(
        f"config: [{TINY}, ../configs/tiny_copy.yaml]\ngrid: {{optim.lr: [1.0e-3, 3.0e-3]}}\n"
        "run_dir: runs/sweeps/{config}/lr{optim.lr}\noverrides: {train.max_steps: 5}\n"
    )
    study_path = tmp_path / "studies" / "s.yaml"
    study_path.parent.mkdir()
    study_path.write_text(  # the sweep path is relative to the study file
        "arms:\n"
        "  - {label: All, sweep: ../sweeps/lr.yaml, configs: [tiny], tune: [optim.lr]}\n"
        "  - {label: Copy, sweep: ../sweeps/lr.yaml, configs: tiny_copy}\n"  # one stem alone: a list of one
    )
    study = load_study(study_path)
    expected = expand_sweep(sweep)
    assert [(run.config_path, run.overrides) for run in study.runs] == expected
    assert [run.entry for run in study.runs] == ["All", "All", "Copy", "Copy"]
    assert [str(run.run_dir) for run in study.runs][2] == "runs/sweeps/tiny_copy/lr0.001"
    assert {run.arm for run in study.runs} == {"All", "Copy"}  # one config each: no stem in the name


def test_a_null_override_reaches_the_config_as_null(tmp_path):
    """`optim.beta1: null` (Adafactor without momentum) is written --optim.beta1=null, not the string 'None'."""
    study = load(tmp_path, "arms:\n  - {label: A, overrides: {optim.name: adafactor, optim.beta1: null}}\n")
    assert "--optim.beta1=null" in study.runs[0].overrides
    assert study.runs[0].config.optim.beta1 is None


def test_figures_are_read_with_their_defaults_and_where_values_as_lists(tmp_path):
    study = load(
        tmp_path,
        """\
arms:
  - {label: AdamW, grid: {optim.lr: [1.0e-3, 3.0e-3]}}
  - {label: Adafactor, overrides: {optim.name: adafactor}, grid: {train.global_batch: [8, 16]}}
figures:
  - name: fig1
    kind: line
    x: train.global_batch
    logx: true
    series: [Adafactor]
    references: {Adamw(factor): [AdamW, Adafactor], Adam: AdamW}
    where: {train.global_batch: 8, optim.lr: [1.0e-3, 3.0e-3]}
    title: Loss
  - {name: t1, kind: table, rows: [Adafactor], columns: train.global_batch}
  - {name: curves, kind: curves}
  - {name: pareto, kind: pareto, series: [AdamW]}
""",
    )
    fig1, table, curves, pareto = study.figures
    assert (fig1.name, fig1.kind, fig1.x, fig1.logx, fig1.title, fig1.series) == (
        "fig1",
        "line",
        "train.global_batch",
        True,
        "Loss",
        ["Adafactor"],
    )
    assert fig1.references == {"Adamw(factor)": ["AdamW", "Adafactor"], "Adam": ["AdamW"]}
    assert fig1.where == {"train.global_batch": [8], "optim.lr": [1e-3, 3e-3]}
    assert (table.rows, table.columns, table.series) == (["Adafactor"], "train.global_batch", [])
    assert (curves.kind, curves.series, curves.where, curves.title) == ("curves", [], {}, "")
    assert pareto.series == ["AdamW"]
    assert (study.results_dir, study.figures_dir) == (Path("runs/studies/s/results"), Path("runs/studies/s/figures"))


def test_a_figure_checks_only_the_entries_it_draws_and_reads_the_runs_of_its_references(tmp_path):
    study = load(
        tmp_path,
        """\
arms:
  - {label: A, grid: {optim.weight_decay: [0.0, 0.1]}, tune: [optim.weight_decay]}
  - {label: B, overrides: {train.global_batch: 16}, grid: {optim.weight_decay: [0.0, 0.1]}}
figures:
  - {name: wd, kind: line, x: optim.weight_decay, series: [B]}
  - {name: lr, kind: table, rows: [B], columns: optim.lr}
  - {name: ref, kind: line, x: train.global_batch, series: [A], references: {B: [B]}, where: {train.global_batch: 16}}
""",
    )
    # wd: A tunes weight_decay but is not drawn; B varies it untuned (one value per arm).
    # lr: B tunes optim.lr by default but keeps it fixed, so each arm has one lr.
    # ref: only B, a reference, has global_batch 16 (A keeps configs/tiny.yaml's 8).
    assert [figure.name for figure in study.figures] == ["wd", "lr", "ref"]
    assert sorted({run.arm for run in study.runs}) == ["A", "B weight_decay=0.0", "B weight_decay=0.1"]


def test_setup_steps_are_read_in_order(tmp_path):
    study = load(
        tmp_path, "setup:\n  - {run: make data, creates: .cache/x}\n  - {run: echo hi}\narms:\n  - {label: A}\n"
    )
    assert [(step.run, step.creates) for step in study.setup] == [("make data", ".cache/x"), ("echo hi", None)]


def test_config_value_reads_every_key_of_every_section():
    cfg = load_config(TINY, ["--optim.lr=0.02", "--train.max_steps=3"])
    for section, cls in section_classes().items():
        for f in dataclasses.fields(cls):
            assert config_value(cfg, f"{section}.{f.name}") == getattr(getattr(cfg, section), f.name)
    assert (config_value(cfg, "optim.lr"), config_value(cfg, "train.max_steps")) == (0.02, 3)
    with pytest.raises(ConfigError, match=r"'optim.Lr' is not a config key.*Did you mean 'optim.lr'"):
        config_value(cfg, "optim.Lr")
    with pytest.raises(ConfigError, match=r"'to_dict' is not a config key"):
        config_value(cfg, "to_dict")


A = "  - {label: A, grid: {optim.lr: [1.0e-3, 3.0e-3]}}\n"
ERRORS = [
    # (id, study body after `config:`, a regex the message must match: the thing and the fix)
    ("top-level key", "figure: []\narms:\n" + A, r"unknown top-level key 'figure'\. Did you mean 'figures'\?"),
    ("no arms", "arms: []\n", r"'arms' must be a non-empty list of entries"),
    (
        "entry key",
        "arms:\n  - {label: A, grd: {optim.lr: [1]}}\n",
        r"entry 'A': unknown key 'grd'\. Did you mean 'grid'",
    ),
    ("no label", "arms:\n  - {grid: {optim.lr: [1.0e-3]}}\n", r"arms\[0\] needs a label .*e\.g\. label: AdamW"),
    ("same label", "arms:\n" + A + A, r"two entries are labelled 'A'; give each entry its own label"),
    (
        "same arm name across entries",
        "arms:\n  - {label: A, grid: {optim.weight_decay: [0.0, 0.1]}}\n  - {label: A weight_decay=0.0}\n",
        r"entries 'A' and 'A weight_decay=0\.0' both have an arm named 'A weight_decay=0\.0'; change one of the labels",
    ),
    (
        "same arm name in an entry",
        "arms:\n  - {label: A, zip: {optim.weight_decay: [0.0, 0.0], optim.beta2: [0.9, 0.95]}}\n",
        # the default run directory names the first zip key only, so the directory clash is found first
        r"entry 'A': several runs share runs/studies/s/runs/a/weight_decay0\.0; the run_dir template .* must tell "
        r"them apart: add \{optim\.beta2\}",
    ),
    (
        "same run directory",
        "arms:\n  - {label: A, grid: {optim.lr: [1.0e-3]}, run_dir: 'runs/x/lr{optim.lr}'}\n"
        "  - {label: B, grid: {optim.lr: [1.0e-3]}, run_dir: 'runs/x/lr{optim.lr}'}\n",
        r"entries 'A' and 'B' both use the run directory runs/x/lr0\.001; give one a different run_dir",
    ),
    (
        "same run directory spelled differently",
        "arms:\n  - {label: A, grid: {optim.lr: [1.0e-3]}, run_dir: 'runs/x/lr{optim.lr}'}\n"
        "  - {label: B, grid: {optim.lr: [1.0e-3]}, run_dir: 'runs/y/../x/lr{optim.lr}'}\n",
        r"entries 'A' and 'B' both use the run directory runs/y/\.\./x/lr0\.001; give one a different run_dir",
    ),
    (
        "same arm name in an entry with its own run_dir",
        "arms:\n  - {label: A, zip: {optim.weight_decay: [0.0, 0.0], optim.beta2: [0.9, 0.95]},"
        " run_dir: 'runs/x/wd{optim.weight_decay}_b{optim.beta2}'}\n",
        r"entry 'A': two of its arms would both be named 'A weight_decay=0\.0' .*put the zip key that tells them "
        r"apart first in 'zip'",
    ),
    (
        "same run directory in an entry",
        "arms:\n  - {label: A, grid: {optim.lr: [1.0e-3, 3.0e-3]}, run_dir: runs/x}\n",
        r"entry 'A': several runs share runs/x; .* add \{optim\.lr\}",
    ),
    (
        "figure key",
        "arms:\n" + A + "figures:\n  - {name: f, kind: curves, serie: [A]}\n",
        r"figure 'f': unknown key 'serie'\. Did you mean 'series'",
    ),
    (
        "figure kind",
        "arms:\n" + A + "figures:\n  - {name: f, kind: lines, x: optim.lr}\n",
        r"figure 'f': kind 'lines' is not a figure kind\. Did you mean 'line'",
    ),
    (
        "figure without kind",
        "arms:\n" + A + "figures:\n  - {name: f}\n",
        r"figure 'f': kind None is not a figure kind\. Valid: line, table, curves, pareto",
    ),
    (
        "figure name",
        "arms:\n" + A + "figures:\n  - {name: a/b, kind: curves}\n",
        r"figures\[0\] needs a name usable as a file stem",
    ),
    (
        "same figure name",
        "arms:\n" + A + "figures:\n  - {name: f, kind: curves}\n  - {name: f, kind: pareto}\n",
        r"two figures are named 'f'.*rename one",
    ),
    (
        "unknown series",
        "arms:\n" + A + "figures:\n  - {name: f, kind: line, x: optim.lr, series: [B]}\n",
        r"figure 'f': series names 'B', which is no entry's label; the entries: \['A'\]",
    ),
    (
        "unknown reference",
        "arms:\n" + A + "figures:\n  - {name: f, kind: line, x: optim.lr, references: {Ref: [A, Adam]}}\n",
        r"figure 'f': references\.Ref names 'Adam', which is no entry's label; the entries: \['A'\]",
    ),
    (
        "unknown row",
        "arms:\n" + A + "figures:\n  - {name: f, kind: table, rows: [AdamW], columns: optim.lr}\n",
        r"figure 'f': rows names 'AdamW', which is no entry's label; the entries: \['A'\]",
    ),
    (
        "line without x",
        "arms:\n" + A + "figures:\n  - {name: f, kind: line}\n",
        r"figure 'f': a line figure needs x, .* e\.g\. x: optim\.rank",
    ),
    (
        "x is no key",
        "arms:\n" + A + "figures:\n  - {name: f, kind: line, x: optim.rnk}\n",
        r"figure 'f': x: 'optim\.rnk' is not a config key.*Did you mean 'optim\.rank'",
    ),
    (
        "table without rows",
        "arms:\n" + A + "figures:\n  - {name: f, kind: table, columns: optim.lr}\n",
        r"figure 'f': a table needs rows, .* e\.g\. rows: \[A\]",
    ),
    (
        "table without columns",
        "arms:\n" + A + "figures:\n  - {name: f, kind: table, rows: [A]}\n",
        r"figure 'f': a table needs columns",
    ),
    (
        "table with series",
        "arms:\n" + A + "figures:\n  - {name: f, kind: table, series: [A], rows: [A], columns: optim.lr}\n",
        r"a table selects its entries with rows, not series",
    ),
    (
        "key of another kind",
        "arms:\n" + A + "figures:\n  - {name: f, kind: pareto, x: optim.lr}\n",
        r"figure 'f': x applies to line figures only; remove it",
    ),
    (
        "where key",
        "arms:\n" + A + "figures:\n  - {name: f, kind: curves, where: {train.batch: 8}}\n",
        r"figure 'f': where: 'train\.batch' is not a config key",
    ),
    (
        "where selects nothing",
        "arms:\n" + A + "figures:\n  - {name: f, kind: curves, where: {optim.lr: 0.1}}\n",
        r"figure 'f' selects no run: where \{'optim\.lr': \[0\.1\]\} matches none of the runs of \['A'\]; "
        r"their values: \{'optim\.lr': \['0\.001', '0\.003'\]\}",
    ),
    (
        "tune typo",
        "arms:\n  - {label: A, grid: {optim.lr: [1.0e-3]}, tune: [optim.Lr]}\n",
        r"entry 'A': tune: 'optim\.Lr' is not a config key.*Did you mean 'optim\.lr'",
    ),
    (
        "tuned but never varied",
        "arms:\n  - {label: A, grid: {optim.lr: [1.0e-3]}, tune: [optim.lr, optim.weight_decay]}\n",
        r"entry 'A': tunes optim\.weight_decay but never varies it: add it to the entry's grid .*or drop it from tune",
    ),
    (
        "study tune never varied",
        "tune: [optim.lr, optim.scale]\narms:\n" + A,
        r"tune names optim\.scale, which no entry varies: add it to an entry's grid, or drop it from tune",
    ),
    (
        "seeds not a list",
        "seeds: 3\narms:\n" + A,
        r"seeds must be a non-empty list of ints, e\.g\. seeds: \[0, 1\]; got 3",
    ),
    ("seeds of strings", "seeds: [0, '1']\narms:\n" + A, r"seeds must be a non-empty list of ints.*got \[0, '1'\]"),
    ("seeds of bools", "seeds: [true]\narms:\n" + A, r"seeds must be a non-empty list of ints"),
    ("seed repeated", "seeds: [1, 1]\narms:\n" + A, r"seeds lists seed 1 twice"),
    (
        "entry sets a seed key",
        "seeds: [0]\narms:\n  - {label: A, grid: {run.seed: [1, 2]}}\n",
        r"entry 'A': sets run\.seed, which `seeds` sets for every run .*remove it from the entry",
    ),
    (
        "entry overrides a seed key",
        "seeds: [0]\narms:\n  - {label: A, overrides: {run.seed: 5}}\n",
        r"entry 'A': sets run\.seed, which `seeds` sets for every run .*remove it from the entry",
    ),
    (
        "seed_keys",
        "seed_keys: [run.sed]\narms:\n" + A,
        r"seed_keys: 'run\.sed' is not a config key.*Did you mean 'run\.seed'",
    ),
    (
        "bad config value",
        "arms:\n  - {label: A, grid: {train.global_batch: [8, 12]}}\n",
        r"entry 'A': run .*global_batch12.*must split",
    ),
    (
        "bad grid key",
        "arms:\n  - {label: A, grid: {optim.lrr: [1]}}\n",
        r"entry 'A': grid: 'optim\.lrr' is not a config key.*Did you mean 'optim\.lr'",
    ),
    ("grid key not a string", "arms:\n  - {label: A, grid: {5: [1]}}\n", r"entry 'A': grid: 5 is not a config key"),
    ("config not a path", "arms:\n  - {label: A, config: 5}\n", r"'config' must be a config file or a list of them"),
    (
        "sweep entry with a grid",
        "arms:\n  - {label: A, sweep: x.yaml, grid: {optim.lr: [1]}}\n",
        r"entry 'A': a sweep entry takes its sweep file as it is, and cannot have 'grid'.*write the entry inline",
    ),
    (
        "missing sweep file",
        "arms:\n  - {label: A, sweep: nowhere.yaml}\n",
        r"entry 'A': sweep file not found: .*nowhere\.yaml.*relative to the study file",
    ),
    (
        "overrides with a sweep entry",
        "overrides: {train.max_steps: 3}\narms:\n  - {label: A, sweep: x.yaml}\n",
        r"entry 'A': the study's top-level overrides would change the runs of the sweep file",
    ),
    ("setup step", "setup: [{cmd: make}]\narms:\n" + A, r"setup\[0\] must be a mapping with a 'run' command"),
    (
        "setup key",
        "setup: [{run: make, creats: x}]\narms:\n" + A,
        r"setup\[0\]: unknown key 'creats'\. Did you mean 'creates'",
    ),
    (
        "empty reference",
        "arms:\n" + A + "figures:\n  - {name: f, kind: line, x: train.global_batch, references: {Ref: []}}\n",
        r"figure 'f': references\.Ref names no entry; list the entries it is the best of",
    ),
    (  # each arm's best run picks its own lr: x would show the first run's, not the best one's
        "figure x tuned",
        "arms:\n  - {label: A, grid: {optim.lr: [1.0e-3, 3.0e-3]}}\nfigures:\n  - {name: f, kind: line, x: optim.lr}\n",
        r"figure 'f': its x optim\.lr is tuned by entry 'A'",
    ),
    (
        "overrides not a mapping",
        "arms:\n  - {label: A, overrides: [optim.lr=1]}\n",
        r"entry 'A': overrides must map dotted keys to values",
    ),
]


@pytest.mark.parametrize("body,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_every_problem_is_a_config_error_naming_the_file_the_place_and_the_fix(tmp_path, body, match):
    path = write_study(tmp_path, body)
    with pytest.raises(ConfigError) as error:
        load_study(path)
    message = str(error.value)
    assert re.search(match, message), message
    assert str(path) in message


def test_an_inline_entry_needs_a_config_and_a_sweep_entry_a_known_config_stem(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("arms:\n  - {label: A, grid: {optim.lr: [1.0e-3]}}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: entry 'A' has no config: set 'config' in the entry or at the top"):
        load_study(path)
    (tmp_path / "sw.yaml").write_text(f"config: {TINY}\nrun_dir: runs/sw\n")
    path.write_text("arms:\n  - {label: A, sweep: sw.yaml, configs: [tiny_copy]}\n")
    with pytest.raises(
        ConfigError, match=r"entry 'A': configs \['tiny_copy'\] are not configs of the sweep; its configs: tiny"
    ):
        load_study(path)


def test_a_missing_or_malformed_study_file_names_itself(tmp_path):
    with pytest.raises(ConfigError, match=r"study file not found: .*nope\.yaml"):
        load_study(tmp_path / "nope.yaml")
    path = tmp_path / "s.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"s\.yaml must hold a mapping"):
        load_study(path)
