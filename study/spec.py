"""The study file: which runs make up a study, how they group into arms, and which figures to draw.

A study file (YAML; paths in it are relative to the file, except `out` and run directories, which
are relative to the working directory, the repo root, like every run directory):

    name: mini                          # optional; default: the file's stem
    out: runs/studies/mini              # optional; default runs/studies/<name>: results/, figures/, runs/
    config: ../mini.yaml                # the default config of every entry
    overrides: {train.max_steps: 200}   # optional: fixed overrides of every run
    tune: [optim.lr]                    # optional; default [optim.lr]: the keys tuned per arm
    seeds: [0, 1]                       # optional: every run is repeated once per seed
    seed_keys: [run.seed, data.seed]    # optional; default [run.seed]: the keys a seed sets
    setup:                              # optional: commands run once, in order, before the first run
      - {run: "python tools/prepare_data.py ...", creates: .cache/tokens/x/manifest.json}
    arms:                               # the entries: each is a sweep (trainer/sweep.py) with a label
      - label: AdamW                    # required, unique: the series name in figures
        overrides: {optim.name: adamw}
        grid: {optim.lr: [1.0e-3, 3.16e-3, 1.0e-2]}
      - label: GaLore
        config: ../other.yaml           # optional: this entry's config(s) (a path or a list)
        grid: {optim.rank: [8, 32, 64], optim.lr: [3.16e-3, 1.0e-2, 3.16e-2]}
        zip: {...}                      # optional: linked keys, as in a sweep file
        run_dir: ...                    # optional template, as in a sweep file (default below)
        tune: [optim.lr, optim.alpha]   # optional: this entry's tuned keys
      - label: AdaMeM 210m
        sweep: ../sweeps/210m_adamem.yaml   # or a sweep file: its configs, grid, zip, overrides, run_dir
        tune: [optim.lr, optim.delta]
    figures:                            # optional; each is one PNG plus the table behind it (CSV, Markdown)
      - {name: fig1_rank, kind: line, x: optim.rank, series: [GaLore, AdaMeM], logx: true,
         references: {Adafactor: [Adafactor], "Adamw(factor)": [AdamW, Adafactor+momentum]},
         where: {train.global_batch: 8}, title: "..."}
      - {name: fig3_batch, kind: line, x: train.global_batch, series: [Adafactor, Adafactor+momentum]}
      - {name: table1_beta2, kind: table, rows: [AdamW, GaLore], columns: optim.beta2}
      - {name: curves, kind: curves}    # val loss of each arm's best run vs tokens and vs FLOPs
      - {name: pareto, kind: pareto}    # final val loss vs optimizer state bytes and vs peak memory

Entries. An entry with `sweep:` takes the sweep file as it is (its run directories too, so runs
made with tools/sweep.py count as done); it may add `label`, `tune` and nothing else. An inline
entry is a sweep written in place: `config` (default: the study's), `overrides` (added to the
study's; an entry's value wins), `grid`, `zip`, `run_dir`. The default run_dir of an inline entry
is `<out>/runs/<label slug>/` + `_`.join(<last part of key><value>) over its zip and grid keys
(+ `{config}` first when it lists several configs). Every run's config is validated (load_config's
checks) when the study loads, before anything runs.

Seeds. With `seeds`, each run of the entries is repeated per seed: `--<key>=<seed>` for every key
of `seed_keys` and `/seed<seed>` appended to its run directory. Without, each run is its own
single replicate (seed = its run.seed).

Arms. The runs of one entry that differ only in the tuned keys and the seed form an arm: the unit
whose best setting is picked (lowest final validation loss, averaged over seeds) and drawn as one
point. An arm's name is its label, then `key=value` for what tells the entry's arms apart (the
config's stem when the entry lists several configs, the first zip key, the untuned grid keys),
e.g. "GaLore rank=8".

Figures select arms by entry label (`series`, `references`, `rows`; default: every entry) and by
resolved config values (`where`: {dotted key: value or list of values}); `x` / `columns` are
dotted config keys read from each arm's resolved config. Kinds: line, table, curves, pareto.
A reference is a horizontal line at the best arm among its entries (e.g. "Adamw(factor)" = the
better of AdamW and Adafactor with momentum).

Every problem is a ConfigError naming the study file, the entry or figure and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer.config import Config

FigureKind = Literal["line", "table", "curves", "pareto"]
FIGURE_KINDS: tuple[str, ...] = ("line", "table", "curves", "pareto")
DEFAULT_TUNE = ("optim.lr",)


@dataclass(frozen=True)
class StudyRun:
    """One training run of a study."""

    entry: str  # the entry's label
    arm: str  # the arm's name (see the module docstring), e.g. "GaLore rank=8"
    seed: int  # the seed of this replicate (its run.seed when the study has no `seeds`)
    tuned: dict[str, Any]  # the tuned keys' values, e.g. {"optim.lr": 0.01}
    config_path: Path
    overrides: list[str]  # --section.key=value ..., the last one --run.dir=<run_dir>
    config: Config  # validated
    run_dir: Path  # as given to --run.dir (relative to the repo root unless absolute)


@dataclass(frozen=True)
class SetupStep:
    run: str  # a shell command, run from the repo root
    creates: str | None = None  # skipped when this path (relative to the repo root) exists


@dataclass(frozen=True)
class FigureSpec:
    name: str  # file stem of the PNG and its tables: <out>/figures/<name>.png/.csv/.md
    kind: FigureKind
    title: str = ""
    series: list[str] = field(default_factory=list)  # entry labels; [] = every entry
    where: dict[str, list[Any]] = field(default_factory=dict)  # config filters (values normalised to lists)
    x: str | None = None  # line: the dotted config key on the x axis
    logx: bool = False  # line: log-scale x
    references: dict[str, list[str]] = field(default_factory=dict)  # line: label -> entry labels
    rows: list[str] = field(default_factory=list)  # table: entry labels, one row each
    columns: str | None = None  # table: the dotted config key whose values are the columns


@dataclass(frozen=True)
class Study:
    path: Path
    name: str
    out: Path  # results/, figures/ and default run directories live here
    runs: list[StudyRun]
    figures: list[FigureSpec]
    setup: list[SetupStep]
    seeds: list[int]  # [] when the file has no `seeds`
    entries: list[str]  # entry labels, in file order

    @property
    def results_dir(self) -> Path:
        return self.out / "results"

    @property
    def figures_dir(self) -> Path:
        return self.out / "figures"


def config_value(config: Config, key: str) -> Any:
    """The value of a dotted key (`optim.rank`) in a resolved config."""
    section, name = key.split(".", 1)
    return config.to_dict()[section][name]


def load_study(path: Path, seeds: list[int] | None = None) -> Study:
    """Read and validate a study file (format: the module docstring); `seeds` replaces its `seeds`.
    A ConfigError naming the file and the fix on any problem, before anything runs."""
    raise NotImplementedError
