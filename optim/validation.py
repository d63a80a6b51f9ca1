"""Config-load-time validation of the `optim` section: `validate_optim_config(cfg)`.

Checks, in this order, and reports every problem found in one ValueError whose lines each name
the key, what is valid and how to fix it:

1. `name` is registered (else: the nearest registered name and the list);
2. every key whose value differs from the OptimConfig default is read by the chosen optimizer
   (its registration's `reads`): a key the optimizer ignores is an error that names the
   optimizers that do read it;
3. the keys the optimizer reads hold valid values: choices (`optim.config.CHOICES`) and ranges
   (`RANGES`);
4. a key set away from its default that another key switches off (`SWITCHED_OFF`: beta2 under beta2_decay,
   warmup_init without relative_step, AdaLomo's clip_threshold under update_norm none) is an error too, as an
   unread key is;
5. the optimizer's own cross-key `check` (from its registration), when 1-4 passed.

Builders assume a config that passed these checks; the optimizer classes keep their own
argument checks (they are public and may be built without a config).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from optim.config import CHOICES, OptimConfig
from optim.registry import REGISTRATIONS, optimizer_keys, registration

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(OptimConfig)}


@dataclass(frozen=True)
class Range:
    """A valid range: `ok(value)` for a number (or None), described as `valid`, e.g. `example`."""

    ok: Callable[[Any], bool]
    valid: str
    example: str


def _number(v: Any) -> bool:
    """A finite int or float (no bool): nan would slip past every comparison, inf through every lower bound."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _number(v) and v > 0


def _non_negative(v: Any) -> bool:
    return _number(v) and v >= 0


def _at_least_one(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


RANGES: dict[str, Range] = {
    "lr": Range(_positive, "> 0", "1e-3"),
    "beta1": Range(lambda v: v is None or (_number(v) and 0 <= v < 1), "in [0, 1), or null for no momentum", "0.9"),
    "beta2": Range(lambda v: _number(v) and 0 < v < 1, "in (0, 1)", "0.95"),
    "eps": Range(_non_negative, ">= 0", "1e-8"),
    "weight_decay": Range(_non_negative, ">= 0", "0.01"),
    "beta2_decay": Range(lambda v: v is None or (_number(v) and v < 0), "< 0, or null for a constant beta2", "-0.8"),
    "eps1": Range(_positive, "> 0", "1e-30"),
    "eps2": Range(_non_negative, ">= 0", "1e-3"),
    "clip_threshold": Range(lambda v: v is None or _positive(v), "> 0, or null (no clipping / the default)", "1.0"),
    "rank": Range(_at_least_one, "an integer >= 1", "128"),
    "update_proj_gap": Range(_at_least_one, "an integer >= 1", "200"),
    "scale": Range(_positive, "> 0", "0.25"),
    "delta": Range(_non_negative, ">= 0", "1.0"),
    "factor_rank": Range(_at_least_one, "an integer >= 1", "1"),
    "factor_iters": Range(_at_least_one, "an integer >= 1", "1"),
}


@dataclass(frozen=True)
class SwitchedOff:
    """`key` set away from its default has no effect while `off(cfg)` holds (`why`, `fix`)."""

    key: str
    by: str  # the key that switches it off
    off: Callable[[OptimConfig], bool]
    why: str
    fix: str


SWITCHED_OFF = (
    SwitchedOff(
        "beta2", "beta2_decay", lambda c: c.beta2_decay is not None, "beta2_t = 1 - t^beta2_decay replaces it",
        "--optim.beta2_decay=null for a constant beta2",
    ),
    SwitchedOff(
        "warmup_init", "relative_step", lambda c: not c.relative_step, "it warms up the relative step only",
        "--optim.relative_step=true",
    ),
    SwitchedOff(
        "clip_threshold", "update_norm", lambda c: c.update_norm == "none", "there is no update normalisation to clip",
        "--optim.update_norm=grouped (or layerwise, global)",
    ),
)  # fmt: skip


def _switched_off_problems(cfg: OptimConfig, reads: frozenset[str]) -> list[str]:
    problems = []
    for rule in SWITCHED_OFF:
        value = getattr(cfg, rule.key)
        if rule.key in reads and rule.by in reads and value != _DEFAULTS[rule.key] and rule.off(cfg):
            problems.append(
                f"optim.{rule.key}={value!r} has no effect with optim.{rule.by}={getattr(cfg, rule.by)!r} "
                f"({rule.why}). Remove it (default {_DEFAULTS[rule.key]!r}) or set {rule.fix}"
            )
    return problems


def readers_of(key: str) -> list[str]:
    """The registered optimizers that read OptimConfig key `key`."""
    return sorted(name for name, entry in REGISTRATIONS.items() if key in entry.reads)


def _unread_problem(cfg: OptimConfig, key: str, value: Any) -> str:
    readers = readers_of(key)
    where = f"it is read by: {', '.join(readers)}" if readers else "no registered optimizer reads it"
    return (
        f"optim.{key}={value!r} is not read by {cfg.name}; {where}. "
        f"Remove it (default {_DEFAULTS[key]!r}) or pick one of those optimizers"
    )


def _choice_problem(key: str, value: Any) -> str | None:
    choices = CHOICES.get(key)
    if choices is None or value in choices or (value is None and _DEFAULTS[key] is None):
        return None
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    null = " (or null)" if _DEFAULTS[key] is None else ""
    return f"optim.{key}={value!r} is not one of {', '.join(choices)}{null}.{hint} Set --optim.{key} to one of them"


def _range_problem(key: str, value: Any) -> str | None:
    rule = RANGES.get(key)
    if rule is None or rule.ok(value):
        return None
    return f"optim.{key}={value!r} is out of range: it must be {rule.valid} (e.g. --optim.{key}={rule.example})"


def validate_optim_config(cfg: OptimConfig) -> None:
    """Raise ValueError naming each invalid or ignored key of `cfg` (see the module docstring)."""
    entry = registration(cfg.name)  # ValueError with the nearest name when unknown
    reads = optimizer_keys(cfg.name)
    problems: list[str] = []
    for key, default in _DEFAULTS.items():
        if key == "name":
            continue
        value = getattr(cfg, key)
        if key not in reads:
            if value != default:
                problems.append(_unread_problem(cfg, key, value))
            continue
        problem = _choice_problem(key, value) or _range_problem(key, value)
        if problem:
            problems.append(problem)
    if not problems:
        problems += _switched_off_problems(cfg, reads)
    if not problems and entry.check is not None:
        try:
            entry.check(cfg)
        except ValueError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(
            f"{len(problems)} problems in the optim config section:\n" + "\n".join(f"- {p}" for p in problems)
        )


def momentum_beta1(cfg: OptimConfig) -> float:
    """optim.beta1 for optimizers whose momentum cannot be switched off (AdamW, GaLore-AdamW).

    Doubles as their registered `check`, and narrows the type for their builders."""
    if cfg.beta1 is None:
        raise ValueError(
            f"{cfg.name} needs optim.beta1 (a float in [0, 1)); null means 'no momentum' only for the Adafactor "
            f"family. Set --optim.beta1=0.9 or remove the key (default 0.9)"
        )
    return cfg.beta1
