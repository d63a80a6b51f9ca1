"""The study file: which runs make up a study, how they group into arms, and which figures to draw.

A study file (YAML; paths in it are relative to the file, except `out` and run directories, which
are relative to the working directory, the repo root, like every run directory):

    name: mini                          # optional; default: the file's stem
    out: runs/studies/mini              # optional; default runs/studies/<name>: results/, figures/, runs/
    config: ../mini.yaml                # the default config of every inline entry
    overrides: {train.max_steps: 200}   # optional: fixed overrides of every inline entry's runs
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
      - label: Adafactor+momentum
        sweep: ../sweeps/210m_adafactor_lr.yaml
        configs: [210m_adafactor_momentum]  # optional: only these of the sweep's configs (by file stem)
    figures:                            # optional; each is one PNG plus the table behind it (CSV, Markdown)
      - {name: fig1_rank, kind: line, x: optim.rank, series: [GaLore, AdaMeM], logx: true,
         references: {Adafactor: [Adafactor], "Adamw(factor)": [AdamW, Adafactor+momentum]},
         where: {train.global_batch: 8}, title: "..."}
      - {name: fig3_batch, kind: line, x: train.global_batch, series: [Adafactor, Adafactor+momentum]}
      - {name: table1_beta2, kind: table, rows: [AdamW, GaLore], columns: optim.beta2}
      - {name: curves, kind: curves}    # val loss of each arm's best run vs tokens and vs FLOPs
      - {name: pareto, kind: pareto}    # final val loss vs optimizer state bytes and vs peak memory

Entries. An entry with `sweep:` takes the sweep file as it is (its run directories too, so runs
made with tools/sweep.py count as done); it may add `label`, `tune` and `configs`, nothing else.
`configs` keeps only the sweep's configs with those file stems, so a sweep file that mixes
optimizers (configs/sweeps/210m_batch_size.yaml) gives one entry, hence one figure series, per
optimizer without copying its grid. The study's `overrides` do not reach a sweep entry (they would
change what its run directories hold), so a study with both is an error. An inline entry is a
sweep written in place: `config` (default: the study's), `overrides` (added to the study's; an
entry's value wins), `grid`, `zip`, `run_dir`. The default run_dir of an inline entry is
`<out>/runs/<label slug>/` + `_`.join(<last part of key><value>) over its first zip key and its grid
keys, in that order (+ `{config}` first when it lists several configs; the other zip keys vary with
the first); the slug is the label lowercased
with every run of other characters than a-z and 0-9 replaced by `-`, e.g. "Adafactor+momentum" ->
`adafactor-momentum`. Every run's config is validated (load_config's checks, through
trainer.sweep.sweep_runs_from_spec) when the study loads, before anything runs; config files read
by several entries are read once.

Seeds. With `seeds`, each run of the entries is repeated per seed: `--<key>=<seed>` for every key
of `seed_keys` (after the entry's fixed overrides, before its zip and grid values) and `/seed<seed>` appended
to its run directory. The runs come seed by seed (every entry's runs for the first seed, then for
the next), so a study stopped half way has every setting of its first seeds (the orderings show each
seed's own; the means and figures wait for every seed). An entry may not set
a seed key itself. Without `seeds`, each run is its own single replicate (seed = its run.seed).

Arms. The runs of one entry that differ only in the tuned keys and the seed form an arm: the unit
whose best setting is picked (lowest final validation loss, averaged over seeds) and drawn as one
point. An arm's name is its label, then what tells the entry's arms apart, space-separated: the
config's stem when the entry lists several configs, then `key=value` for the first untuned zip
key and for each untuned grid key (key = the last part of the dotted key, or the whole dotted key
where two of them share a last part; value = the resolved config's), e.g. "GaLore rank=8" or
"Figure 3 210m_adamw global_batch=64". Two different arms may not share a name.

Tuned keys. An entry's tuned keys are its `tune`, else the study's `tune`, else [optim.lr]. Each
run's `tuned` holds, read from its resolved config, those of them that the entry varies (a grid or
zip key), plus optim.lr when the entry keeps it fixed (one lr is still the setting a reader wants to
see; an lr the entry varies but does not tune is part of the arm instead). A key
named in an entry's `tune` must be varied by that entry, and one in the study's `tune` by at least
one entry: a key tuned but never varied is most likely a typo (optim.Lr), so it is an error.

Figures select arms by entry label (`series`, `references`, `rows`; default: every entry) and by
resolved config values (`where`: {dotted key: value or list of values}); `x` / `columns` are
dotted config keys read from each arm's resolved config. Kinds: line (needs `x`; may have `logx`,
`references`), table (needs `rows` and `columns`; selects by `rows`, not `series`), curves,
pareto; a key of another kind is an error. A reference is a horizontal line at the best arm among
its entries (e.g. "Adamw(factor)" = the better of AdamW and Adafactor with momentum). A figure
that selects no run at all (a `where` value no run has) is an error. Names are unique file stems.

Every problem is a ConfigError naming the study file, the entry or figure and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer.config import Config, ConfigError, section_classes
from trainer.config_parsing import read_yaml_mapping, suggest
from trainer.sweep import SweepRun, read_sweep, sweep_runs_from_spec

FigureKind = Literal["line", "table", "curves", "pareto"]
FIGURE_KINDS: tuple[str, ...] = ("line", "table", "curves", "pareto")
DEFAULT_TUNE = ("optim.lr",)
DEFAULT_SEED_KEYS = ("run.seed",)

STUDY_KEYS = ("name", "out", "config", "overrides", "tune", "seeds", "seed_keys", "setup", "arms", "figures")
INLINE_ENTRY_KEYS = ("label", "config", "overrides", "grid", "zip", "run_dir", "tune")
SWEEP_ENTRY_KEYS = ("label", "sweep", "configs", "tune")
FIGURE_KEYS = ("name", "kind", "title", "series", "where", "x", "logx", "references", "rows", "columns")
# The keys that only some kinds read (the others: name, kind, title, where, and series but for tables).
KIND_ONLY_KEYS = {"x": "line", "logx": "line", "references": "line", "rows": "table", "columns": "table"}
SETUP_KEYS = ("run", "creates")


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
    creates: str | None = None  # skipped when this path exists (data.paths.resolve_path: the repo root, .cache/ ->
    # MEMOPT_CACHE)


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

    def drawn(self, labels: list[str]) -> list[str]:
        """The entries the figure draws as lines, points or rows: its series (table: rows); none = all `labels`."""
        return self.series or self.rows or labels


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


@functools.cache
def config_keys() -> frozenset[str]:
    """Every dotted key of a Config (`optim.lr`, `train.global_batch`, ...)."""
    return frozenset(f"{name}.{f.name}" for name, cls in section_classes().items() for f in dataclasses.fields(cls))


def config_value(config: Config, key: str) -> Any:
    """The value of a dotted key (`optim.rank`) in a resolved config, any section; a ConfigError naming the
    closest key when `key` is not one."""
    if key not in config_keys():
        raise ConfigError(f"{key!r} is not a config key (section.key).{suggest(key, config_keys())}")
    section, name = key.split(".", 1)
    return getattr(getattr(config, section), name)


@dataclass
class _Entry:
    """One entry of the study file, checked and turned into a sweep mapping (trainer/sweep.py's format)."""

    label: str
    where: str  # "<study file>: entry 'X'", the start of every message about it
    sweep: dict[str, Any]  # config, grid, zip, overrides, run_dir
    base_dir: Path  # what the sweep's config paths are relative to
    source: str  # names the sweep in messages: `where`, plus the sweep file for a sweep entry
    tune: list[str]

    @property
    def configs(self) -> list[Any]:
        config = self.sweep["config"]
        return config if isinstance(config, list) else [config]

    @property
    def varied(self) -> list[str]:
        """The keys the entry's runs vary: zip keys, then grid keys (mappings checked by the sweep code)."""
        parts = [self.sweep.get("zip"), self.sweep.get("grid")]
        return [key for part in parts if isinstance(part, dict) for key in part]


def load_study(path: Path, seeds: list[int] | None = None) -> Study:
    """Read and validate a study file (format: the module docstring); `seeds` replaces its `seeds`.
    A ConfigError naming the file and the fix on any problem, before anything runs."""
    path = Path(path)
    raw = _read_mapping(path)
    _check_keys(raw, STUDY_KEYS, f"{path}: unknown top-level key", "remove it or fix its spelling")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: name must be a non-empty string (the study's name), got {name!r}")
    out = raw.get("out", f"runs/studies/{name}")
    if not isinstance(out, str) or not out:
        raise ConfigError(f"{path}: out must be a directory path, e.g. out: runs/studies/{name}; got {out!r}")
    study_overrides = _mapping(raw.get("overrides"), f"{path}: overrides", "{train.max_steps: 200}")
    study_tune = _key_list(raw.get("tune", list(DEFAULT_TUNE)), f"{path}: tune", "tune: [optim.lr]")
    seed_list = _seeds(seeds, "--seeds") if seeds is not None else _seeds(raw.get("seeds"), f"{path}: seeds")
    seed_keys = _key_list(raw.get("seed_keys", list(DEFAULT_SEED_KEYS)), f"{path}: seed_keys", "[run.seed]")
    setup = _setup(path, raw.get("setup"))
    entries = _entries(path, raw, Path(out), study_overrides, study_tune)
    labels = [entry.label for entry in entries]
    figures = _figures(path, raw.get("figures"), labels)
    if "tune" in raw:
        _check_study_tune(path, study_tune, entries)
    if seed_list:
        for entry in entries:
            _check_no_seed_keys(entry, seed_keys)

    raw_configs: dict[Path, dict] = {}  # config files shared by entries and seeds are read once
    runs: list[StudyRun] = []
    arm_of: dict[str, tuple[str, tuple[Any, ...]]] = {}  # arm name -> (entry, what tells its runs apart)
    replicates: list[int | None] = [*seed_list] or [None]  # None: each run its own replicate
    for seed in replicates:
        for entry in entries:
            for sweep_run in _expand(entry, seed, seed_keys, raw_configs):
                runs.append(_study_run(path, entry, sweep_run, seed, arm_of))
    _check_distinct_run_dirs(path, runs)
    for figure in figures:
        _check_figure_axis_is_not_tuned(path, figure, entries)
        _check_figure_selects_runs(path, figure, runs, labels)
    return Study(path, name, Path(out), runs, figures, setup, seed_list, labels)


def _read_mapping(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "study", "configs/studies/mini.yaml", "arms, figures, ... (see study/spec.py)")


def _check_keys(raw: dict[str, Any], allowed: tuple[str, ...], what: str, fix: str) -> None:
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{what} {key!r}.{suggest(str(key), allowed)} ({fix})")


def _mapping(value: Any, where: str, example: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must map dotted keys to values, e.g. {example}; got {value!r}")
    return value


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or key not in config_keys():
        raise ConfigError(f"{where}: {key!r} is not a config key (section.key).{suggest(str(key), config_keys())}")
    return key


def _key_list(value: Any, where: str, example: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of dotted config keys, e.g. {example}; got {value!r}")
    return [_check_key(key, where) for key in value]


def _seeds(value: Any, where: str) -> list[int]:
    if value is None:
        return []
    # bool is an int subclass: `seeds: [true]` is a mistake, not seed 1
    if not isinstance(value, list) or not value or not all(type(s) is int for s in value):
        raise ConfigError(f"{where} must be a non-empty list of ints, e.g. seeds: [0, 1]; got {value!r}")
    repeated = [s for s, n in Counter(value).items() if n > 1]
    if repeated:
        raise ConfigError(f"{where} lists seed {repeated[0]} twice; list each seed once")
    return list(value)


def _setup(path: Path, value: Any) -> list[SetupStep]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{path}: setup must be a list of {{run: COMMAND, creates: PATH}}; got {value!r}")
    steps = []
    for i, step in enumerate(value):
        where = f"{path}: setup[{i}]"
        if not isinstance(step, dict) or not isinstance(step.get("run"), str):
            raise ConfigError(f"{where} must be a mapping with a 'run' command, e.g. {{run: make data}}; got {step!r}")
        _check_keys(step, SETUP_KEYS, f"{where}: unknown key", "a setup step has 'run' and optionally 'creates'")
        creates = step.get("creates")
        if creates is not None and not isinstance(creates, str):
            raise ConfigError(f"{where}: creates must be a path (relative to the repo root); got {creates!r}")
        steps.append(SetupStep(step["run"], creates))
    return steps


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "entry"


def _entries(
    path: Path, raw: dict[str, Any], out: Path, study_overrides: dict[str, Any], study_tune: list[str]
) -> list[_Entry]:
    arms = raw.get("arms")
    if not isinstance(arms, list) or not arms:
        raise ConfigError(f"{path}: 'arms' must be a non-empty list of entries (each a label with a sweep or a grid)")
    entries: list[_Entry] = []
    for i, item in enumerate(arms):
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: arms[{i}] must be a mapping (label, grid, ... or label, sweep); got {item!r}")
        label = item.get("label")
        if not isinstance(label, str) or not label.strip():
            raise ConfigError(f"{path}: arms[{i}] needs a label (its series name in figures), e.g. label: AdamW")
        if label in (entry.label for entry in entries):
            raise ConfigError(f"{path}: two entries are labelled {label!r}; give each entry its own label")
        where = f"{path}: entry {label!r}"
        tune = study_tune
        if "tune" in item:
            tune = _key_list(item["tune"], f"{where}: tune", "tune: [optim.lr, optim.delta]")
        if "sweep" in item:
            entry = _sweep_entry(path, item, where, tune, study_overrides)
        else:
            entry = _inline_entry(path, raw, item, where, tune, out, study_overrides)
        if "tune" in item:
            missing = [key for key in entry.tune if key not in entry.varied]
            if missing:
                raise ConfigError(
                    f"{where}: tunes {', '.join(missing)} but never varies it: add it to the entry's grid "
                    f"(or zip), or drop it from tune (varied here: {', '.join(entry.varied) or 'nothing'})"
                )
        entries.append(entry)
    return entries


def _sweep_entry(
    path: Path, item: dict[str, Any], where: str, tune: list[str], study_overrides: dict[str, Any]
) -> _Entry:
    _check_keys(
        item,
        SWEEP_ENTRY_KEYS,
        f"{where}: a sweep entry takes its sweep file as it is, and cannot have",
        "it may add label, tune and configs: move the key into the sweep file, or write the entry inline",
    )
    if study_overrides:
        raise ConfigError(
            f"{where}: the study's top-level overrides would change the runs of the sweep file it names (and so "
            f"what its run directories hold); move them into the inline entries, or write this entry inline"
        )
    if not isinstance(item["sweep"], str):
        raise ConfigError(f"{where}: sweep must be the path of a sweep file (relative to the study file)")
    sweep_path = path.parent / item["sweep"]
    source = f"{where} (sweep {sweep_path})"
    try:
        sweep = read_sweep(sweep_path)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e} (sweep paths are relative to the study file)") from None
    if "configs" in item:
        sweep = {**sweep, "config": _pick_configs(where, sweep, item["configs"])}
    return _Entry(item["label"], where, sweep, sweep_path.parent, source, tune)


def _pick_configs(where: str, sweep: dict[str, Any], stems: Any) -> list[Any]:
    """The sweep's configs whose file stems `stems` names, in the sweep's order."""
    stems = [stems] if isinstance(stems, str) else stems
    configs = sweep.get("config")
    configs = configs if isinstance(configs, list) else [configs]
    have = [Path(str(config)).stem for config in configs]
    if not isinstance(stems, list) or not stems or not all(isinstance(s, str) for s in stems):
        raise ConfigError(f"{where}: configs must list config file stems of the sweep, e.g. [{have[0]}]")
    unknown = [stem for stem in stems if stem not in have]
    if unknown:
        raise ConfigError(f"{where}: configs {unknown} are not configs of the sweep; its configs: {', '.join(have)}")
    return [config for config, stem in zip(configs, have, strict=True) if stem in stems]


def _inline_entry(
    path: Path,
    raw: dict[str, Any],
    item: dict[str, Any],
    where: str,
    tune: list[str],
    out: Path,
    study_overrides: dict[str, Any],
) -> _Entry:
    _check_keys(item, INLINE_ENTRY_KEYS, f"{where}: unknown key", "an entry has these keys, or label + sweep")
    config = item.get("config", raw.get("config"))
    if config is None:
        raise ConfigError(f"{where} has no config: set 'config' in the entry or at the top of the study file")
    overrides = {**study_overrides, **_mapping(item.get("overrides"), f"{where}: overrides", "{optim.name: adamw}")}
    sweep: dict[str, Any] = {"config": config, "overrides": overrides}
    for key in ("grid", "zip"):
        if key in item:
            if isinstance(item[key], dict):  # its keys name the run directories below: config keys
                for varied in item[key]:
                    _check_key(varied, f"{where}: {key}")
            sweep[key] = item[key]
    entry = _Entry(item["label"], where, sweep, path.parent, where, tune)
    run_dir = item.get("run_dir")
    if run_dir is None:
        # Every independent axis is in the name, so the runs of one entry never share a directory; of the
        # zip keys only the first (they vary together: the rest would only lengthen the name).
        zipped = entry.sweep.get("zip")
        linked = list(zipped)[1:] if isinstance(zipped, dict) else []
        parts = (["{config}"] if len(entry.configs) > 1 else []) + [
            f"{key.rsplit('.', 1)[-1]}{{{key}}}" for key in entry.varied if key not in linked
        ]
        run_dir = f"{out}/runs/{_slug(item['label'])}" + ("/" + "_".join(parts) if parts else "")
    elif not isinstance(run_dir, str) or not run_dir:
        raise ConfigError(f"{where}: run_dir must be a directory template, e.g. runs/x/lr{{optim.lr}}")
    sweep["run_dir"] = run_dir
    return entry


def _check_study_tune(path: Path, tune: list[str], entries: list[_Entry]) -> None:
    varied = {key for entry in entries for key in entry.varied}
    for key in tune:
        if key not in varied and key not in DEFAULT_TUNE:
            raise ConfigError(
                f"{path}: tune names {key}, which no entry varies: add it to an entry's grid, "
                f"or drop it from tune (varied: {', '.join(sorted(varied)) or 'nothing'})"
            )


def _check_no_seed_keys(entry: _Entry, seed_keys: list[str]) -> None:
    fixed = entry.sweep.get("overrides")
    set_keys = [*entry.varied, *(fixed if isinstance(fixed, dict) else {})]
    clash = [key for key in seed_keys if key in set_keys]
    if clash:
        raise ConfigError(
            f"{entry.source}: sets {clash[0]}, which `seeds` sets for every run (seed_keys); remove it from the "
            f"entry (or drop `seeds` from the study to seed runs yourself)"
        )


def _expand(entry: _Entry, seed: int | None, seed_keys: list[str], raw_configs: dict[Path, dict]) -> list[SweepRun]:
    sweep = entry.sweep
    if seed is not None:
        fixed = sweep.get("overrides") or {}
        sweep = {
            **sweep,
            "overrides": {**fixed, **dict.fromkeys(seed_keys, seed)} if isinstance(fixed, dict) else fixed,
            "run_dir": f"{str(sweep['run_dir']).rstrip('/')}/seed{seed}",
        }
    return sweep_runs_from_spec(sweep, entry.base_dir, entry.source, raw_configs)


def _study_run(
    path: Path,
    entry: _Entry,
    sweep_run: SweepRun,
    seed: int | None,
    arm_of: dict[str, tuple[str, tuple[Any, ...]]],
) -> StudyRun:
    cfg = sweep_run.config
    varied = entry.varied
    tuned_keys = [key for key in entry.tune if key in varied]
    tuned_keys += [key for key in DEFAULT_TUNE if key not in varied]  # a fixed lr: still the setting a reader wants
    zip_keys = list(entry.sweep.get("zip") or {})
    arm_keys = [key for key in varied if key not in tuned_keys]  # zip keys first, then grid keys
    several = len(entry.configs) > 1
    identity = (sweep_run.config_path if several else None, *(config_value(cfg, key) for key in arm_keys))
    named = [key for key in arm_keys if key not in zip_keys]
    first_zip = [key for key in arm_keys if key in zip_keys][:1]
    named = first_zip + named
    short = [key.rsplit(".", 1)[-1] for key in named]
    parts = [sweep_run.config_path.stem] if several else []
    for key, last in zip(named, short, strict=True):
        shown = last if short.count(last) == 1 else key
        parts.append(f"{shown}={config_value(cfg, key)}")
    arm = " ".join([entry.label, *parts])
    owner = (entry.label, identity)
    if arm_of.setdefault(arm, owner) != owner:
        other = arm_of[arm][0]
        if other == entry.label:
            raise ConfigError(
                f"{entry.where}: two of its arms would both be named {arm!r} (they differ in a zip key after the "
                f"first, which names the arm); put the zip key that tells them apart first in 'zip'"
            )
        raise ConfigError(
            f"{path}: entries {other!r} and {entry.label!r} both have an arm named {arm!r}; change one of the labels"
        )
    run_dir = sweep_run.overrides[-1].removeprefix("--run.dir=")
    return StudyRun(
        entry=entry.label,
        arm=arm,
        seed=cfg.run.seed if seed is None else seed,
        tuned={key: config_value(cfg, key) for key in tuned_keys},
        config_path=sweep_run.config_path,
        overrides=sweep_run.overrides,
        config=cfg,
        run_dir=Path(run_dir),
    )


def _check_distinct_run_dirs(path: Path, runs: list[StudyRun]) -> None:
    """Two runs in one directory would resume each other; within one entry the sweep code already checked."""
    seen: dict[str, str] = {}
    for run in runs:
        key = os.path.normpath(run.run_dir)
        other = seen.setdefault(key, run.entry)
        if other != run.entry:
            raise ConfigError(
                f"{path}: entries {other!r} and {run.entry!r} both use the run directory {run.run_dir}; give one "
                f"a different run_dir (or, for default run directories, a label that differs in letters or digits)"
            )


def _figures(path: Path, value: Any, labels: list[str]) -> list[FigureSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{path}: figures must be a list of {{name, kind, ...}}; got {value!r}")
    figures: list[FigureSpec] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"{path}: figures[{i}] must be a mapping with name and kind; got {item!r}")
        name = item.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise ConfigError(
                f"{path}: figures[{i}] needs a name usable as a file stem (letters, digits, _ . -), e.g. "
                f"name: fig1_rank; got {name!r}"
            )
        if name in (figure.name for figure in figures):
            raise ConfigError(f"{path}: two figures are named {name!r} (one would overwrite the other); rename one")
        figures.append(_figure(f"{path}: figure {name!r}", item, labels))
    return figures


def _figure(where: str, item: dict[str, Any], labels: list[str]) -> FigureSpec:
    _check_keys(item, FIGURE_KEYS, f"{where}: unknown key", "see the figure keys in study/spec.py")
    kind = item.get("kind")
    if kind not in FIGURE_KINDS:
        hint = suggest(str(kind), FIGURE_KINDS) if kind is not None else f" Valid: {', '.join(FIGURE_KINDS)}."
        raise ConfigError(f"{where}: kind {kind!r} is not a figure kind.{hint}")
    for key, owner in KIND_ONLY_KEYS.items():
        if key in item and kind != owner:
            raise ConfigError(f"{where}: {key} applies to {owner} figures only; remove it from this {kind} figure")
    if kind == "table" and "series" in item:
        raise ConfigError(f"{where}: a table selects its entries with rows, not series; rename series to rows")
    title = item.get("title", "")
    if not isinstance(title, str):
        raise ConfigError(f"{where}: title must be a string; got {title!r}")
    logx = item.get("logx", False)
    if not isinstance(logx, bool):
        raise ConfigError(f"{where}: logx must be true or false; got {logx!r}")
    series = _labels(item.get("series"), f"{where}: series", labels)
    references: dict[str, list[str]] = {}
    for ref, entries in _mapping(item.get("references"), f"{where}: references", "{Adafactor: [Adafactor]}").items():
        references[str(ref)] = _labels(entries, f"{where}: references.{ref}", labels)
        if not references[str(ref)]:
            raise ConfigError(f"{where}: references.{ref} names no entry; list the entries it is the best of")
    rows = _labels(item.get("rows"), f"{where}: rows", labels)
    where_values = {
        _check_key(key, f"{where}: where"): values if isinstance(values, list) else [values]
        for key, values in _mapping(item.get("where"), f"{where}: where", "{train.global_batch: 8}").items()
    }
    x = item.get("x")
    columns = item.get("columns")
    if kind == "line":
        if x is None:
            raise ConfigError(f"{where}: a line figure needs x, the config key on its x axis, e.g. x: optim.rank")
        _check_key(x, f"{where}: x")
    if kind == "table":
        if not rows:
            raise ConfigError(f"{where}: a table needs rows, the entries it lists, e.g. rows: [{', '.join(labels)}]")
        if columns is None:
            raise ConfigError(f"{where}: a table needs columns, the config key of its columns, e.g. optim.beta2")
        _check_key(columns, f"{where}: columns")
    name = item["name"]
    return FigureSpec(name, kind, title, series, where_values, x, logx, references, rows, columns)


def _labels(value: Any, where: str, labels: list[str]) -> list[str]:
    """A list of entry labels (one label alone is read as a list of one)."""
    if value is None:
        return []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(label, str) for label in value):
        raise ConfigError(f"{where} must be a list of entry labels; got {value!r}")
    unknown = [label for label in value if label not in labels]
    if unknown:
        raise ConfigError(f"{where} names {unknown[0]!r}, which is no entry's label; the entries: {labels}")
    return value


def _check_figure_axis_is_not_tuned(path: Path, figure: FigureSpec, entries: list[_Entry]) -> None:
    """A line figure's x or a table's columns holds one value per arm; a key that an entry tunes over a grid has
    one value per run, and the figure would show an arbitrary run's, not the best one's."""
    axis = figure.x if figure.kind == "line" else figure.columns if figure.kind == "table" else None
    if axis is None:
        return
    chosen = figure.drawn([entry.label for entry in entries])
    for entry in entries:
        if entry.label in chosen and axis in entry.tune and axis in entry.varied:
            what = "x" if figure.kind == "line" else "columns"
            raise ConfigError(
                f"{path}: figure {figure.name!r}: its {what} {axis} is tuned by entry {entry.label!r} (each arm keeps "
                f"its best value), so it has no one value per arm; put a key the arms differ in on the {what} (the "
                f"loss at each tuned value is the lr_curve column of the arms table)"
            )


def _check_figure_selects_runs(path: Path, figure: FigureSpec, runs: list[StudyRun], labels: list[str]) -> None:
    """A figure whose `where` keeps no run of its entries is a typo (a batch size no run has) or a stale filter."""
    chosen = set(figure.drawn(labels))
    chosen |= {label for entries in figure.references.values() for label in entries}
    candidates = [run for run in runs if run.entry in chosen]
    if any(all(config_value(run.config, k) in v for k, v in figure.where.items()) for run in candidates):
        return
    present = {key: sorted({str(config_value(run.config, key)) for run in candidates}) for key in figure.where}
    raise ConfigError(
        f"{path}: figure {figure.name!r} selects no run: where {figure.where} matches none of the runs of "
        f"{sorted(chosen)}; their values: {present}. Fix the where values"
    )
