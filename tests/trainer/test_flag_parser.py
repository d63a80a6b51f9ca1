"""trainer.flag_parser: the tools accept a long flag with `-` or `_` between its words."""

from __future__ import annotations

import sys

import pytest

from trainer.flag_parser import FlagParser


def parser() -> FlagParser:
    p = FlagParser(prog="tool")
    p.add_argument("--seq-len", type=int, default=512)  # the benchmarks' spelling
    p.add_argument("--prepared_dir", default="tokens")  # the data tools' spelling
    p.add_argument("--verify_bench", "--verify-bench", default=None)  # both declared
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--slurm-option", action="append", default=[], dashed_value=True)
    p.add_argument("values", nargs="*")
    return p


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--seq_len", "8"], {"seq_len": 8}),
        (["--seq_len=8"], {"seq_len": 8}),
        (["--seq-len=8"], {"seq_len": 8}),
        (["--prepared-dir", "d"], {"prepared_dir": "d"}),
        (["--prepared-dir=a-b_c"], {"prepared_dir": "a-b_c"}),  # only the flag is respelled, not its value
        (["--verify-bench", "v"], {"verify_bench": "v"}),
        (["--verify_bench", "v"], {"verify_bench": "v"}),
        (["--no-progress"], {"no_progress": True}),
        (["--seq_l", "8"], {"seq_len": 8}),  # argparse's unambiguous prefixes, in either spelling
        (["--prepared-d", "d"], {"prepared_dir": "d"}),
        (["--verify", "v"], {"verify_bench": "v"}),  # a prefix of both spellings of one flag: not ambiguous
        (["x", "--", "--seq_len", "8"], {"values": ["x", "--seq_len", "8"], "seq_len": 512}),  # after --: values
        # A value that starts with dashes (an sbatch option), given as the next word or after =.
        (
            ["--slurm-option", "--time=1:00:00", "--slurm_option", "-p gpu"],
            {"slurm_option": ["--time=1:00:00", "-p gpu"]},
        ),
        (["--slurm-option=--gres=gpu:8", "--seq-len", "3"], {"slurm_option": ["--gres=gpu:8"], "seq_len": 3}),
        (["--slurm_opt", "--time=1"], {"slurm_option": ["--time=1"]}),  # a prefix of a dashed-value flag too
    ],
)
def test_either_spelling_reaches_the_declared_flag(argv, expected):
    args = vars(parser().parse_args(argv))
    assert {key: args[key] for key in expected} == expected


def test_an_exact_match_in_either_spelling_wins_over_a_prefix():
    p = FlagParser(prog="tool")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seq_len_max", type=int, default=0)
    assert vars(p.parse_args(["--seq_len", "8"])) == {"seq_len": 8, "seq_len_max": 0}
    assert vars(p.parse_args(["--seq-len-m", "8"])) == {"seq_len": 512, "seq_len_max": 8}


def test_flags_of_argument_groups_are_respelled_too():
    p = FlagParser(prog="tool")
    p.add_argument_group("data").add_argument("--seq-len", type=int, default=512)
    p.add_mutually_exclusive_group().add_argument("--prepared_dir", default="tokens")
    assert vars(p.parse_args(["--seq_len", "8", "--prepared-d", "d"])) == {"seq_len": 8, "prepared_dir": "d"}


def test_without_abbreviations_a_prefix_stays_an_error(capsys):
    p = FlagParser(prog="tool", allow_abbrev=False)
    p.add_argument("--seq-len", type=int, default=512)
    with pytest.raises(SystemExit):
        p.parse_args(["--seq_l", "8"])
    assert "unrecognized arguments: --seq_l" in capsys.readouterr().err
    assert p.parse_args(["--seq_len", "8"]).seq_len == 8


def test_a_dashed_value_flag_without_its_value_is_argparses_error(capsys):
    for argv in (["--slurm-option"], ["--slurm-option", "--", "x"]):
        with pytest.raises(SystemExit):
            parser().parse_args(argv)
        assert "argument --slurm-option: expected one argument" in capsys.readouterr().err


def test_the_command_line_is_read_when_no_args_are_given(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tool", "--seq_len=16", "--no-progress"])
    args = parser().parse_args()
    assert (args.seq_len, args.no_progress) == (16, True)


def test_an_unknown_flag_is_still_an_error_in_the_users_spelling(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["--seq_lenn", "8"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --seq_lenn" in capsys.readouterr().err


def test_help_shows_the_declared_spelling(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--seq-len SEQ_LEN" in out and "--prepared_dir PREPARED_DIR" in out and "--seq_len" not in out
