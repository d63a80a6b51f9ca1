"""Typed dataclasses from YAML: the generic machinery behind trainer/config.py.

- `read_yaml` follows `base:` inheritance; `parse_overrides` turns `--section.key=value` into the
  same nested dict; `merge` lays one over the other.
- `build_section` checks every key and value against the dataclass's annotations (`coerce`):
  unknown keys name the closest valid one, `Literal[...]` choices name the valid values.
- `field_docs` reads each field's one-line doc from the attribute docstring under it (the
  convention of OLMo-core and torchtitan), so the doc is written once, next to the field, and
  `--help` is generated from it.

Hand-written rather than a CLI library (tyro, jsonargparse): the project's contract is YAML files
plus `--section.key=value` overrides with YAML scalars, inheritance through `base:`, and errors
that name the fix, which is about a hundred lines over `typing` and `ast`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigYamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader on libyaml's parser when PyYAML was built with it (the wheels are): the same
    constructor and resolver, 10x faster than the pure-Python parser, which was most of a config's load time
    (sweeps load hundreds). A key given twice in one mapping is an error: YAML keeps the last silently, so a
    second `optim:` section would drop every key of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: its keys may be overridden here
            key = (key_node.tag, key_node.value)  # the resolved tag and the text: no second construction
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found the key {key_node.value!r} twice in one mapping (keep one)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the key and the fix."""


def closest(name: str, choices: typing.Iterable[str]) -> str | None:
    """The choice closest to `name`, ignoring case (ADAMW -> adamw: the commonest slip), or None."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.5)
    return by_lower[close[0]] if close else None


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """' Did you mean X?' for the closest choice, else the list of valid ones."""
    choices = list(choices)
    close = closest(name, choices)
    return f" Did you mean {close!r}?" if close else f" Valid: {', '.join(sorted(choices))}."


def merge(base: dict, override: dict) -> dict:
    """`override` laid over `base`, recursively for nested mappings."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_mapping(path: Path, kind: str, example: str, holds: str) -> dict:
    """The mapping a YAML file holds (a config, sweep or study file: `kind`); a ConfigError when the
    file is missing (naming `example`), is not YAML, or holds something else than a mapping (of `holds`)."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory. Pass the path of a YAML {kind} file in it, e.g. {example}")
    if not path.is_file():
        raise ConfigError(f"{kind} file not found: {path}. Pass the path of a YAML {kind} file, e.g. {example}")
    try:
        raw = yaml.load(path.read_text(), Loader=ConfigYamlLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if raw is None:  # an empty file would silently mean every default (a 8000-step 210m run, for a config)
        raise ConfigError(f"{path} is empty: write its {holds}, or pass another file, e.g. {example}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of {holds}, got {type(raw).__name__}")
    return raw


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file, following `base:` (a path relative to the file) for inheritance."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config inheritance loop through {path}")
    raw = read_yaml_mapping(path, "config", "configs/tiny.yaml", "sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return merge(read_yaml(path.parent / base, (*_seen, path)), raw)


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
            parsed = yaml.load(value, Loader=ConfigYamlLoader) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        out.setdefault(parts[0], {})[parts[1]] = parsed
    return out


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, bool, str, Literal, Optional);
    accept ints (and numeric strings such as YAML 1.1's '1e-3') for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        close = closest(value, [str(c) for c in choices]) if isinstance(value, str) else None
        hint = f" Did you mean {close!r}?" if close else ""  # the choices are listed already
        raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(repr, choices))}.{hint}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # Optional[X]: X's own message, plus "or null"
            raise ConfigError(errors[0] + " (or null)")
        raise ConfigError(f"{where}: expected {describe_type(tp)}, got {value!r}")
    return coerce_scalar(value, tp, where)


def coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    """`value` as the scalar type `tp` (float, int, bool or str), or a ConfigError naming `where`."""
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
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


def describe_type(tp: Any) -> str:
    """'int', 'float or null', "'auto' | 'cpu' | 'cuda'", ... for help texts and messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(c) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe_type(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


@cache
def field_types(cls: type) -> dict[str, Any]:
    """{field: its resolved annotation} of dataclass `cls`, in field order. Cached: resolving the string
    annotations (`from __future__ import annotations`) was half of a config's load time once YAML was fast."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_section(cls: type, values: dict, section: str) -> Any:
    """An instance of dataclass `cls` from `values`; unknown keys and wrong types are errors."""
    hints = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {section}.{key}.{suggest(key, hints)}")
        kwargs[key] = coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: doc} from the string literal right under each field of dataclass `cls` (and of
    its dataclass bases), whitespace collapsed to one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]  # the ClassDef getsource returned
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
