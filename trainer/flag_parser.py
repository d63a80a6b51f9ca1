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
from collections.abc import Callable, Sequence
from typing import Any


class FlagParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that also accepts each long flag with `-` and `_` swapped (`--seq_len` for
    `--seq-len`, including argparse's unambiguous prefixes and the `--flag=value` form). An exact match in
    either spelling wins over a prefix. Flags of argument groups are respelled too.

    `add_argument(..., dashed_value=True)`: the flag's value may itself start with `-`, as an sbatch option
    does (`--slurm-option --time=24:00:00`); argparse would read it as another flag and stop with "expected
    one argument" unless written `--slurm-option=--time=24:00:00`. (Only the parser's own add_argument takes it,
    not an argument group's.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.dashed_value_flags: set[str] = set()
        super().__init__(*args, **kwargs)

    def add_argument(self, *name_or_flags: str, dashed_value: bool = False, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*name_or_flags, **kwargs)
        if dashed_value:
            self.dashed_value_flags.update(flag for flag in name_or_flags if flag.startswith("--"))
        return action

    @property
    def long_flags(self) -> dict[str, argparse.Action]:
        """{--flag: its action} of every long flag declared, through the parser or any of its argument groups
        (they share the parser's action list)."""
        return {flag: action for action in self._actions for flag in action.option_strings if flag.startswith("--")}

    def declared(self, flag: str) -> str:
        """The declared flag that `flag` names in either spelling: an exact match first, then (with argparse's
        allow_abbrev) the one flag it abbreviates; else `flag` unchanged, for argparse to report."""
        words = flag[2:]
        spellings = list(dict.fromkeys([flag, "--" + words.replace("_", "-"), "--" + words.replace("-", "_")]))
        long_flags = self.long_flags
        for spelling in spellings:
            if spelling in long_flags:
                return spelling
        if self.allow_abbrev:
            matches = {known: action for known, action in long_flags.items() if known.startswith(tuple(spellings))}
            if len({id(action) for action in matches.values()}) == 1:  # aliases of one flag count once
                return next(iter(matches))
        return flag

    def parse_known_args(  # type: ignore[override]  # typeshed's overloads; the behaviour is argparse's
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        given = list(sys.argv[1:] if args is None else args)
        respelled: list[str] = []
        i = 0
        while i < len(given):
            arg = given[i]
            if arg == "--":  # everything after it is a positional value
                respelled += given[i:]
                break
            if arg.startswith("--"):
                flag, eq, value = arg.partition("=")
                flag = self.declared(flag)
                takes_next = i + 1 < len(given) and given[i + 1] != "--"
                if not eq and flag in self.dashed_value_flags and takes_next:
                    eq, value = "=", given[i + 1]  # the next word is the value, whatever it starts with
                    i += 1
                arg = flag + eq + value
            respelled.append(arg)
            i += 1
        return super().parse_known_args(respelled, namespace)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `minimum` (argparse names the flag in its usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse
