"""The tools' command-line parser: a long flag may be spelled with `-` or `_` between its words.

The data tools name their flags after config keys (`--prepared_dir`, `--seq_len`) and the benchmarks follow
argparse's custom (`--micro-batch`, `--seq-len`); a user who moves between them should not have to remember
which is which. torchrun accepts both spellings too (`--nproc-per-node`, `--nproc_per_node`). `--help`
shows the spelling each tool declares; the other is accepted silently (argparse has no hidden aliases, so
the command line is respelled before argparse reads it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


class FlagParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that also accepts each long flag with `-` and `_` swapped (`--seq_len` for
    `--seq-len`, including argparse's unambiguous prefixes and the `--flag=value` form)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.long_flags: list[str] = []  # before argparse's __init__, which adds --help
        super().__init__(*args, **kwargs)

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action:
        self.long_flags += [flag for flag in name_or_flags if flag.startswith("--")]
        return super().add_argument(*name_or_flags, **kwargs)

    def respelled(self, flag: str) -> str:
        """The flag as this parser declares it (or a prefix of a declared flag), else unchanged."""
        if any(known.startswith(flag) for known in self.long_flags):
            return flag
        words = flag[2:]
        for candidate in ("--" + words.replace("_", "-"), "--" + words.replace("-", "_")):
            if any(known.startswith(candidate) for known in self.long_flags):
                return candidate
        return flag

    def parse_known_args(  # type: ignore[override]  # typeshed's overloads; the behaviour is argparse's
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        given = list(sys.argv[1:] if args is None else args)
        respelled: list[str] = []
        for i, arg in enumerate(given):
            if arg == "--":  # everything after it is a positional value
                respelled += given[i:]
                break
            if arg.startswith("--"):
                flag, eq, value = arg.partition("=")
                arg = self.respelled(flag) + eq + value
            respelled.append(arg)
        return super().parse_known_args(respelled, namespace)
