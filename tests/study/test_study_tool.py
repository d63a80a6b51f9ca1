"""tools/study.py in-process: clear errors for bad input, and a SLURM script of only the runs left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from study.results import ArmSummary, SettingResult
from tests.helpers.runs import REPO
from tools.study import describe_arm, main


def write_study(tmp_path, lrs="[1.0e-3, 1.0e-2]"):
    path = tmp_path / "s.yaml"
    path.write_text(
        f"out: {tmp_path / 'out'}\nconfig: {REPO / 'configs/tiny.yaml'}\noverrides: {{train.max_steps: 6}}\n"
        f"arms:\n  - {{label: AdamW, grid: {{optim.lr: {lrs}}}}}\n"
    )
    return path


def test_bad_input_is_one_error_line_and_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main([str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.yaml" in err
    assert main([str(write_study(tmp_path)), "--seeds", "0,x"]) == 1
    assert "error: --seeds '0,x' is not a list of integers; write e.g. --seeds 0,1" in capsys.readouterr().err
    assert main([str(write_study(tmp_path)), "--slurm", str(tmp_path / "a.sbatch"), "--slurm-option", "time=1"]) == 1
    assert "is not an sbatch option" in capsys.readouterr().err


def test_slurm_script_covers_only_the_runs_left(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    study = write_study(tmp_path)
    done = tmp_path / "out" / "runs" / "adamw" / "lr0.001"
    done.mkdir(parents=True)
    (done / "metrics.jsonl").write_text(json.dumps({"step": 6, "val/loss": 4.0}) + "\n")
    script = tmp_path / "study.sbatch"
    launcher = ["--launcher", "torchrun --nproc_per_node=8", "--jobs", "4"]
    options = ["--slurm-option", "--gpus-per-node=8", "--slurm-option", "--time=24:00:00"]  # as the README writes them
    assert main([str(study), "--slurm", str(script), *launcher, *options]) == 0
    text = script.read_text()
    assert "#SBATCH --array=0-0%1" in text
    assert "#SBATCH --gpus-per-node=8\n#SBATCH --time=24:00:00\n" in text
    assert "--optim.lr=0.01" in text and "--optim.lr=0.001" not in text
    assert f"submit with: sbatch {script}" in capsys.readouterr().out


def test_bad_counts_and_paths_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    import pytest

    monkeypatch.chdir(REPO)
    study = str(write_study(tmp_path))
    for argv, message in (
        ([study, "--run", "--jobs", "0"], "--jobs must be at least 1, got 0"),
        ([study, "--slurm", "x.sbatch", "--jobs", "-1"], "--jobs must be at least 1, got -1"),
        ([study, "--slurm", str(tmp_path / "no" / "x.sbatch")], f"the directory {tmp_path / 'no'} does not exist"),
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "no").exists() and not (tmp_path / "out").exists()


def test_setup_steps_left_are_listed_and_refused_for_slurm_until_setup_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    made = tmp_path / "made.txt"  # outside the repo: an absolute `creates` path
    study = write_study(tmp_path)
    study.write_text(study.read_text() + f"setup:\n  - {{run: 'echo hi > {made}', creates: {made}}}\n")
    assert main([str(study)]) == 0
    out = capsys.readouterr().out
    assert "# setup left: run these first (--setup runs them; --run too)" in out and f"echo hi > {made}" in out
    script = tmp_path / "study.sbatch"
    assert main([str(study), "--slurm", str(script)]) == 1
    err = capsys.readouterr().err
    assert f"error: the study's setup has not run here ({made} missing)" in err and "--setup` first" in err
    assert not script.exists()
    assert main([str(study), "--setup"]) == 0 and made.read_text() == "hi\n"
    assert main([str(study), "--slurm", str(script)]) == 0 and script.exists()
    assert "# setup left" not in capsys.readouterr().out


def test_a_relative_slurm_path_is_taken_from_where_the_command_runs(tmp_path, monkeypatch, capsys):
    import pytest

    study = str(write_study(tmp_path))
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)  # the tool moves to the repo root afterwards
    assert main([study, "--slurm", "sub/x.sbatch"]) == 0
    assert (tmp_path / "sub" / "x.sbatch").exists() and not (REPO / "sub").exists()
    assert f"sbatch {tmp_path / 'sub' / 'x.sbatch'}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:  # it writes the script only: --run / --collect would be dropped
        main([study, "--slurm", "sub/y.sbatch", "--run"])
    assert exited.value.code == 2 and "--slurm writes the array script only" in capsys.readouterr().err


def test_run_exits_1_when_a_run_failed(tmp_path, monkeypatch, capsys):
    """`make study` and schedulers read the exit status; the tables of the rest are written first."""
    monkeypatch.chdir(REPO)
    study = str(write_study(tmp_path, lrs="[1.0e-3]"))
    assert main([study, "--run", "--launcher", "false", "--jobs", "1"]) == 1
    captured = capsys.readouterr()
    assert "error: 1 run(s) failed" in captured.err and "re-run the same command" in captured.err
    assert "1 failed" in captured.out and (tmp_path / "out" / "results").is_dir()


def test_seeds_flag_takes_a_trailing_comma_and_refuses_an_empty_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    study = str(write_study(tmp_path))
    assert main([study, "--seeds", "0,1,"]) == 0  # 2 lrs x 2 seeds
    assert capsys.readouterr().out.startswith("# study s: 4 runs: ")
    assert main([study, "--seeds", " , "]) == 1
    assert capsys.readouterr().err == "error: --seeds is empty; write e.g. --seeds 0,1\n"


def test_status_lists_the_commands_of_incomplete_and_failed_runs_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    study = str(write_study(tmp_path))
    incomplete = tmp_path / "out" / "runs" / "adamw" / "lr0.001"
    incomplete.mkdir(parents=True)
    (incomplete / "metrics.jsonl").write_text(json.dumps({"step": 3, "train/loss": 5.0}) + "\n")
    failed = tmp_path / "out" / "runs" / "adamw" / "lr0.01"
    failed.mkdir(parents=True)
    (failed / "failed.json").write_text(json.dumps({"exit_code": 1, "message": "boom"}))
    assert main([study]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# study s: 2 runs: 0 complete, 0 diverged, 1 failed, 1 incomplete, 0 pending; 2 left"
    assert len(lines) == 3 and "--optim.lr=0.001" in lines[1] and "--optim.lr=0.01" in lines[2]


def test_setup_with_slurm_runs_the_setup_then_writes_the_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    made = tmp_path / "made.txt"
    study = write_study(tmp_path)
    study.write_text(study.read_text() + f"setup:\n  - {{run: 'echo hi > {made}', creates: {made}}}\n")
    script = tmp_path / "study.sbatch"
    assert main([str(study), "--setup", "--slurm", str(script), "--jobs", "1"]) == 0
    assert made.read_text() == "hi\n"
    assert "#SBATCH --array=0-1%1\n" in script.read_text()  # 2 runs left, one at a time (--jobs 1)


def test_collect_lists_the_orderings_file_among_the_paths_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    assert main([str(write_study(tmp_path)), "--collect"]) == 0
    out = capsys.readouterr().out
    orderings = tmp_path / "out" / "results" / "orderings.md"
    assert orderings.read_text().startswith("# Observed orderings: study s\n")
    assert f"  {orderings}\n" in out.split("written:\n", 1)[1]


def test_an_arm_whose_best_lr_is_at_the_grid_edge_says_to_widen_the_grid() -> None:
    best = SettingResult(tuned={"optim.lr": 0.01}, losses={0: 4.12, 1: 4.1268}, mean=4.1234)
    arm = ArmSummary(
        entry="adamw", arm="adamw", runs=[], settings=[best], best=best, best_per_seed={}, edge="high", complete=False
    )
    assert describe_arm(arm) == (
        "adamw: optim.lr=0.01 -> 4.1234 (seed 0: 4.1200, seed 1: 4.1268)"
        " [best lr at the grid's high edge: widen the lr grid] [incomplete]"
    )


def test_slurm_with_collect_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    script = tmp_path / "x.sbatch"
    with pytest.raises(SystemExit) as exited:
        main([str(write_study(tmp_path)), "--slurm", str(script), "--collect"])
    assert exited.value.code == 2 and "--slurm writes the array script only: run --collect after the array" in (
        capsys.readouterr().err
    )
    assert not script.exists() and not (tmp_path / "out").exists()
