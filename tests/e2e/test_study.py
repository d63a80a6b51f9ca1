"""tools/study.py end to end on a micro study (seconds per run): plan -> run 2 at a time -> killed while
a run is in progress -> run again (finished runs skipped, the interrupted one resumed, the diverged one
kept as a result) -> results tables, figures and orderings."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.helpers.runs import REPO, tiny_overrides
from tools.study import main as study_main

MAX_STEPS = 12  # checkpoints at 3, 6, 9: a run is in progress long enough after its first one to kill it
LRS = {"AdamW": [1.0e-2, 1.0e3], "Adafactor": [1.0e-2, 3.0e-2]}  # AdamW at lr 1e3 diverges


def write_study(tmp_path: Path, tokens: Path) -> Path:
    overrides = {}
    for arg in tiny_overrides(tmp_path / "unused", tokens, **{"train.max_steps": MAX_STEPS, "eval.interval": 6}):
        key, value = arg[2:].split("=", 1)
        if key not in ("run.dir", "optim.lr"):  # the run directory is the study's; lr is tuned
            overrides[key] = yaml.safe_load(value)
    overrides["log.tensorboard"] = False
    study = {
        "name": "micro",
        "out": str(tmp_path / "out"),
        "config": str(REPO / "configs" / "tiny.yaml"),
        "overrides": overrides,
        "seeds": [0],
        "arms": [
            {"label": "AdamW", "overrides": {"optim.name": "adamw"}, "grid": {"optim.lr": LRS["AdamW"]}},
            {
                "label": "Adafactor",
                "overrides": {"optim.name": "adafactor", "optim.beta1": None},
                "grid": {"optim.lr": LRS["Adafactor"]},
            },
        ],
        "figures": [
            {
                "name": "batch",
                "kind": "line",
                "x": "train.global_batch",
                "series": ["Adafactor"],
                "references": {"AdamW": ["AdamW"]},
            },
            {"name": "table", "kind": "table", "rows": ["AdamW", "Adafactor"], "columns": "optim.name"},
            {"name": "curves", "kind": "curves"},
            {"name": "pareto", "kind": "pareto"},
        ],
    }
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def study_tool(*args: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "tools/study.py", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **kw,
    )


def run_dirs(tmp_path: Path) -> dict[str, Path]:
    """{"AdamW 0.01": run dir, ...} from the default run directory layout."""
    root = tmp_path / "out" / "runs"
    return {f"{label} {lr}": root / label.lower() / f"lr{lr}" / "seed0" for label, lrs in LRS.items() for lr in lrs}


def finished(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return any(r.get("step") == MAX_STEPS and "val/loss" in r for r in records)


def checkpointed(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("step_*.pt"))


def test_micro_study_runs_resumes_after_a_kill_and_collects(tmp_path, sample_tokens, monkeypatch, capsys):
    study = write_study(tmp_path, sample_tokens)
    dirs = run_dirs(tmp_path)

    # The plan, in-process (no second torch import): the status counts and the commands left.
    monkeypatch.chdir(REPO)
    assert study_main([str(study)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# study micro: 4 runs: 0 complete, 0 diverged, 0 failed, 0 incomplete, 4 pending; 4 left"
    assert len(lines) == 5 and all(line.startswith("python train.py configs/tiny.yaml ") for line in lines[1:])

    # First session, killed (SIGKILL to its process group, children included) once a run has finished and
    # another is in progress past its first checkpoint.
    first = study_tool(str(study), "--run", "--jobs", "2", start_new_session=True)
    deadline = time.time() + 60
    interrupted: list[str] = []
    while time.time() < deadline and first.poll() is None:
        done = [name for name, d in dirs.items() if finished(d)]
        interrupted = [name for name, d in dirs.items() if checkpointed(d) and not finished(d)]
        if done and interrupted:
            os.killpg(first.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    first_out = first.communicate(timeout=30)[0]
    assert first.returncode == -signal.SIGKILL, first_out
    assert interrupted, first_out
    done_before = {name for name, d in dirs.items() if finished(d)}
    diverged_before = (dirs["AdamW 1000.0"] / "diverged.json").exists()
    assert "[1/4] start AdamW optim.lr=0.01 seed 0 -> " in first_out

    # Second session: finishes the study, skipping what finished, resuming what was interrupted.
    second = study_tool(str(study), "--run", "--jobs", "2")
    out = second.communicate(timeout=120)[0]
    assert second.returncode == 0, out
    left = 4 - len(done_before) - diverged_before
    assert f"study micro: 4 runs, {4 - left} finished, {left} to run" in out
    for name in done_before:
        label, lr = name.split()
        assert f"start {label} optim.lr={lr} " not in out  # skipped
    for name in interrupted:
        assert "resumed from" in (dirs[name] / "train.log").read_text(), name
    assert all(finished(d) for name, d in dirs.items() if name != "AdamW 1000.0")
    assert (dirs["AdamW 1000.0"] / "diverged.json").exists()
    assert not list(tmp_path.glob("out/runs/**/failed.json"))
    assert "study wall time: " in out.splitlines()[-1]

    # Results: every run with its status, the arms' best settings, the figures and their tables, orderings.
    results, figures = tmp_path / "out" / "results", tmp_path / "out" / "figures"
    with (results / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["status"] for r in rows) == ["complete"] * 3 + ["diverged"]
    assert "AdamW" in (results / "arms.md").read_text() and "Adafactor" in (results / "arms.md").read_text()
    for name in ("batch", "table", "curves", "pareto"):
        assert (figures / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (figures / f"{name}.csv").exists() and (figures / f"{name}.md").exists(), name
    assert "best setting per arm" in out and "AdamW: optim.lr=" in out
    orderings = (results / "orderings.md").read_text().splitlines()
    assert any("Adafactor" in line and "AdamW" in line for line in orderings)
    assert "orderings:" in out and all(line[2:] in out for line in orderings if line.startswith("- "))
