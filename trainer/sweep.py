"""Sweep files: a grid of `--section.key=value` overrides over one or more configs.

A sweep file names a config (relative to itself) or a list of them, a grid of dotted keys,
optionally linked ("zipped") keys, and a run directory template:

    config: [../paper/210m_adamw.yaml, ../paper/210m_adafactor.yaml]
    grid:                                   # crossed: every combination of the values
      optim.lr: [3.16e-4, 1.0e-3, 3.16e-3]
    zip:                                    # linked: the i-th values of every key go together
      train.global_batch: [256, 1024]
      train.max_steps: [32000, 8000]
    run_dir: runs/sweeps/{config}/bs{train.global_batch}_lr{optim.lr}
    overrides: {train.max_grad_norm: 1.0}   # optional fixed overrides

The runs are the cartesian product configs x zip rows x grid points, in that nesting order (the
last grid key varies fastest): with `zip` above, 2 configs x 2 rows x 3 lr = 12 runs, and a run
with global_batch 256 always has max_steps 32000. `grid` and `zip` are both optional (no grid and
no zip: one run per config).

Rules (each broken one is a ConfigError naming the sweep file and the fix):
- top-level keys are config, grid, zip, run_dir and overrides; config and run_dir are required;
- every `grid` and `zip` value is a non-empty list, and all `zip` lists have the same length;
- a key appears in at most one of overrides, grid and zip, and run.dir in none (run_dir sets it);
- run_dir placeholders: `{config}` is the config file's stem, `{section.key}` a grid or zip value
  (dotted, so they are filled by plain replacement, not str.format); every `{...}` must name one
  of them, and no two runs may share a run directory (name every key that varies);
- every run's config passes `load_config`'s checks (section, key, type, range and cross-key rules)
  before any run starts; `sweep_runs` returns each run's validated Config with it.

Each run's overrides are the fixed overrides, then the zip row, then the grid point, then
`--run.dir=<run_dir>` (a null value is written `null`, as the command line parses it).

`sweep_runs(path)` expands a sweep file; `sweep_runs_from_spec(mapping, base_dir, source)` expands
the same mapping written elsewhere (a study file's inline entry: study/spec.py), with its config
paths relative to `base_dir` and `source` naming it in errors.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trainer.config import Config, ConfigError, config_from_mapping
from trainer.config_parsing import read_yaml, read_yaml_mapping

SWEEP_KEYS = ("config", "grid", "zip", "run_dir", "overrides")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: the config file, its overrides (the last is --run.dir=...) and the validated Config."""

    config_path: Path
    overrides: list[str]
    config: Config


def expand_sweep(sweep_path: Path) -> list[tuple[Path, list[str]]]:
    """(config path, overrides) per run of the sweep (format and rules: the module docstring)."""
    return [(run.config_path, run.overrides) for run in sweep_runs(sweep_path)]


def sweep_runs(sweep_path: Path) -> list[SweepRun]:
    """Every run of the sweep with its validated Config; a ConfigError before returning any if one is invalid."""
    return sweep_runs_from_spec(read_sweep(sweep_path), sweep_path.parent, str(sweep_path))


def read_sweep(sweep_path: Path) -> dict[str, Any]:
    """The mapping a sweep file holds (not yet checked: sweep_runs_from_spec does that); a ConfigError when the
    file is missing, is not YAML or does not hold a mapping."""
    return read_yaml_mapping(
        sweep_path, "sweep", "configs/sweeps/210m_adamw_lr.yaml", "config, grid, zip, run_dir, overrides"
    )


def sweep_runs_from_spec(
    spec: dict[str, Any], base_dir: Path, source: str, raw_configs: dict[Path, dict] | None = None
) -> list[SweepRun]:
    """sweep_runs on a sweep already read into a mapping (a sweep file's, or one written inline in a study file):
    `base_dir` is where its config paths are relative to, `source` names it in every error message, and
    `raw_configs` (config path -> its read_yaml mapping, filled as files are read) lets several sweeps that
    share config files read each one once."""
    unknown = set(spec) - set(SWEEP_KEYS)
    if unknown or "config" not in spec or "run_dir" not in spec:
        raise ConfigError(
            f"{source}: a sweep needs 'config' and 'run_dir' (+ 'grid', 'zip', 'overrides'); unknown: {sorted(unknown)}"
        )
    configs = spec["config"] if isinstance(spec["config"], list) else [spec["config"]]
    if not configs or not all(isinstance(name, str) and name for name in configs):
        raise ConfigError(f"{source}: 'config' must be a config file or a list of them, got {spec['config']!r}")
    grid = _value_lists(source, "grid", spec.get("grid") or {})
    zipped = _value_lists(source, "zip", spec.get("zip") or {})
    fixed = spec.get("overrides") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{source}: 'overrides' must map dotted keys to values, e.g. {{train.max_steps: 200}}")
    _check_zip_lengths(source, zipped)
    _check_disjoint(source, fixed, grid, zipped)
    # One row per zip position; no zip = one empty row, so the product below still has its runs.
    zip_rows = [dict(zip(zipped, row, strict=True)) for row in zip(*zipped.values(), strict=True)] if zipped else [{}]
    # Each config file read once (YAML parsing is most of a validation's cost).
    raw: dict[Path, dict] = {} if raw_configs is None else raw_configs
    runs = []
    for name, row, values in itertools.product(configs, zip_rows, itertools.product(*grid.values())):
        config = (base_dir / name).resolve()
        point = {**row, **dict(zip(grid, values, strict=True))}
        run_dir = _fill_run_dir(source, spec["run_dir"], config, point)
        overrides = [f"--{k}={_override_text(v)}" for k, v in {**fixed, **point}.items()] + [f"--run.dir={run_dir}"]
        if config not in raw:
            raw[config] = read_yaml(config)
        # load_config(config, overrides) without re-reading the file: fails on a typo before anything runs
        try:
            validated = config_from_mapping(raw[config], overrides)
        except ConfigError as e:  # name the sweep and the run, so a study of many sweeps says which one is wrong
            raise ConfigError(f"{source}: run {run_dir} ({config.name}): {e}") from None
        runs.append(SweepRun(config, overrides, validated))
    _check_distinct_run_dirs(source, spec["run_dir"], [run.overrides[-1] for run in runs], grid, zipped)
    _check_distinct_runs(source, runs)
    return runs


def _check_distinct_runs(source: str, runs: list[SweepRun]) -> None:
    """Two runs with one config (all but run.dir) would train the same thing twice, and a study would keep one of
    their results: a value written twice in a grid, e.g. optim.lr: [1.0e-3, 1e-3] (YAML reads the second as the
    string '1e-3', which names another directory and loads as the same number)."""
    seen: dict[str, str] = {}
    for run in runs:
        run_dir = run.config.run.dir
        # The config without its directory, as the dataclasses' repr (one text per config): a YAML dump of each
        # took 1.6 s of the 210m study's 1.7 s load, this takes milliseconds.
        nameless = replace(run.config, run=replace(run.config.run, dir=""))
        key = f"{run.config_path}\n{nameless!r}"
        if key in seen:
            raise ConfigError(
                f"{source}: runs {seen[key]} and {run_dir} are the same run ({run.config_path.name} with the same "
                "settings): a grid or zip value is listed twice, perhaps spelled two ways (1.0e-3 and 1e-3); list "
                "each value once"
            )
        seen[key] = run_dir


def _override_text(value: Any) -> str:
    """A value as the YAML scalar an override is parsed with: str() except None, whose str() 'None' YAML reads
    as a string, so `optim.beta1: null` in a sweep would not mean null on the command line."""
    return "null" if value is None else str(value)


def _value_lists(source: str, section: str, mapping: Any) -> dict[str, list]:
    """`grid` / `zip`: a mapping of dotted keys to non-empty lists of values."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: '{section}' must map dotted keys to lists of values, e.g. optim.lr: [1e-3]")
    for key, values in mapping.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: {section} key {key!r} is not a dotted config key (section.key)")
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{source}: {section}.{key} must be a non-empty list of values, got {values!r} "
                f"(write {key}: [{values!r}] for a single value, or move it to 'overrides')"
            )
    return mapping


def _check_zip_lengths(source: str, zipped: dict[str, list]) -> None:
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{key} has {n}" for key, n in lengths.items())
        raise ConfigError(
            f"{source}: the 'zip' lists vary together, so they need equal lengths: {listed}; "
            f"give every zipped key one value per row (or move a key to 'grid' to cross it instead)"
        )


def _check_disjoint(source: str, fixed: dict, grid: dict, zipped: dict) -> None:
    if "run.dir" in {*fixed, *grid, *zipped}:
        raise ConfigError(f"{source}: set the run directory with the top-level 'run_dir' template, not run.dir")
    for key, count in Counter([*fixed, *grid, *zipped]).items():
        if count > 1:
            places = [
                name for name, section in (("overrides", fixed), ("grid", grid), ("zip", zipped)) if key in section
            ]
            raise ConfigError(f"{source}: {key} is set in both {' and '.join(places)}; keep it in one of them")


def _fill_run_dir(source: str, template: str, config: Path, point: dict[str, Any]) -> str:
    run_dir = template.replace("{config}", config.stem)
    for key, value in point.items():
        run_dir = run_dir.replace("{" + key + "}", str(value))
    left = _PLACEHOLDER.findall(run_dir)
    if left:
        raise ConfigError(
            f"{source}: run_dir placeholder(s) {', '.join(left)} name no grid or zip key; "
            f"use {{config}} or one of: {', '.join('{' + key + '}' for key in point) or '(none)'}"
        )
    return run_dir


def _check_distinct_run_dirs(
    source: str, template: str, run_dir_args: list[str], grid: dict[str, list], zipped: dict[str, list]
) -> None:
    """Two runs in one directory would resume each other (the trainer treats a directory as one run)."""
    shared = [run_dir for run_dir, count in Counter(run_dir_args).items() if count > 1]
    if shared:
        for key, values in grid.items():
            repeated = [v for i, v in enumerate(values) if v in values[:i]]
            if repeated:  # e.g. [1.0e-3, 0.001]: the same run twice, whatever the template
                raise ConfigError(
                    f"{source}: grid {key} lists {repeated[0]!r} more than once: {values}; drop the repeat"
                )
        varying = [key for key, values in {**zipped, **grid}.items() if len(set(map(str, values))) > 1]
        missing = [key for key in varying if "{" + key + "}" not in template]
        raise ConfigError(
            f"{source}: several runs share {shared[0].removeprefix('--run.dir=')}; the run_dir template "
            f"{template!r} must tell them apart: add {', '.join('{' + k + '}' for k in missing) or '{config}'}"
        )
