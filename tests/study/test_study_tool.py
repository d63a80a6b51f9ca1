"""tools/study.py in-process: clear errors for bad input, and a SLURM script of only the runs left."""

from __future__ import annotations

import json

from tests.helpers.runs import REPO
from tools.study import main


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
    assert main([str(study), "--slurm", str(script), "--launcher", "torchrun --nproc_per_node=8", "--jobs", "4"]) == 0
    text = script.read_text()
    assert "#SBATCH --array=0-0%1" in text
    assert "--optim.lr=0.01" in text and "--optim.lr=0.001" not in text
    assert f"submit with: sbatch {script}" in capsys.readouterr().out
