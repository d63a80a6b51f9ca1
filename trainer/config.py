"""Typed run configuration: dataclass sections loaded from YAML, overridden by `--section.key=value`.

Resolution order: dataclass defaults < the model flavour's values (model.flavor) < the YAML file
(and the files it names with `base:`, relative to itself) < command-line overrides. Unknown keys
and wrong types fail before any work starts, naming the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data.config import DataConfig
from model.config import FLAVORS, ModelConfig
from optim.config import OptimConfig


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key and the fix."""


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run directory: config.yaml, metrics.jsonl, TensorBoard events, checkpoints
    seed: int = 0  # model initialisation


@dataclass
class SchedulerConfig:
    warmup_steps: int = 2500  # linear warmup from 0 to optim.lr
    final_lr_ratio: float = 0.1  # cosine decays to final_lr_ratio * optim.lr at train.max_steps (OLMo's default)


@dataclass
class TrainConfig:
    max_steps: int = 8000  # optimizer steps
    global_batch: int = 1024  # sequences per optimizer step, over all ranks
    micro_batch: int = 16  # sequences per forward/backward on one rank (gradient accumulation fills the rest)
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    fused_update: bool = False  # update each parameter inside backward (optim/in_backward.py)
    compile: bool = False  # torch.compile every transformer block


@dataclass
class EvalConfig:
    interval: int = 500  # evaluate at step 0, every `interval` steps and at the end; 0 = only at the end
    batch_size: int = 16  # sequences per evaluation forward


@dataclass
class LogConfig:
    interval: int = 10  # console line and metrics every `interval` steps
    tensorboard: bool = True


@dataclass
class CheckpointConfig:
    interval: int = 1000  # save every `interval` steps (and at the end, and on SIGTERM/SIGINT)
    keep_last: int = 3  # older checkpoints are deleted after a successful save
    resume: bool = True  # resume from the run directory's latest checkpoint if one exists


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(sorted(choices))}."


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a config file, following `base:` (a path relative to the file) for inheritance."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Pass a YAML file, e.g. configs/tiny.yaml")
    if path in _seen:
        raise ConfigError(f"config inheritance loop through {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _merge(read_yaml(path.parent / base, _seen + (path,)), raw)


def parse_overrides(args: list[str]) -> dict:
    """['--optim.lr=3e-3', '--run.dir=runs/x'] -> {'optim': {'lr': 3e-3}, 'run': {'dir': 'runs/x'}}.
    Values are parsed as YAML scalars (so null, true, 3e-3 and [1, 2] work)."""
    out: dict = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"bad override {arg!r}: use --section.key=value, e.g. --optim.lr=3e-3")
        key, value = arg[2:].split("=", 1)
        parts = key.split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"bad override {arg!r}: the key must be section.key, e.g. --train.max_steps=200")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        out.setdefault(parts[0], {})[parts[1]] = parsed
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; accept ints (and numeric strings such as
    YAML 1.1's '1e-3') for floats. Anything else that does not match is an error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e6 written in YAML
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp}")


def _build_section(cls: type, values: dict, section: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {section}.{key}.{_suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def build_config(raw: dict) -> Config:
    hints = typing.get_type_hints(Config)
    sections = {f.name for f in dataclasses.fields(Config)}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r}.{_suggest(name, sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of keys, got {values!r}")
    model_raw = dict(raw.get("model", {}))
    flavor = model_raw.get("flavor", ModelConfig.flavor)
    if flavor not in FLAVORS:
        raise ConfigError(f"unknown model.flavor {flavor!r}.{_suggest(str(flavor), FLAVORS)}")
    raw = {**raw, "model": {**FLAVORS[flavor], **model_raw}}
    return Config(**{name: _build_section(hints[name], raw.get(name, {}), name) for name in sections})


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw = read_yaml(path) if path is not None else {}
    cfg = build_config(_merge(raw, parse_overrides(list(overrides))))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-key checks that need no data or device."""
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t = cfg.train
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
            f"raise --model.max_seq_len or lower --data.seq_len"
        )
    if t.global_batch <= 0 or t.micro_batch <= 0 or t.max_steps < 0:
        raise ConfigError("train.global_batch and train.micro_batch must be positive, train.max_steps >= 0")
    if t.global_batch % t.micro_batch:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch={t.micro_batch}"
        )
    choices = {"train.precision": (t.precision, ("auto", "fp32", "bf16")), "train.device": (t.device, ("auto", "cpu", "cuda"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    if cfg.scheduler.warmup_steps < 0 or not 0 <= cfg.scheduler.final_lr_ratio <= 1:
        raise ConfigError("scheduler.warmup_steps must be >= 0 and scheduler.final_lr_ratio in [0, 1]")
    if cfg.log.interval <= 0 or cfg.checkpoint.interval <= 0 or cfg.eval.interval < 0:
        raise ConfigError("log.interval and checkpoint.interval must be positive, eval.interval >= 0")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be at least 1 (the latest checkpoint is always kept)")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
