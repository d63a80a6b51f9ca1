"""study/results.py, figure_data.py, orderings.py, tables.py and report.py on synthetic run directories (hand-written
metrics.jsonl and markers, no training): run status and numbers, best-setting picking over seeds, edge flags, the
rows behind every figure kind, the orderings lines, the written tables, and the errors for a damaged or missing
metrics.jsonl."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from study.failed_marker import FAILED_FILE, read_failed
from study.figure_data import figure_data
from study.orderings import orderings
from study.report import write_tables
from study.results import (
    ArmSummary,
    RunResult,
    StudyResultsError,
    collect,
    lr_curve,
    run_result,
    summarize_arms,
)
from study.spec import FigureSpec, Study, StudyRun
from study.tables import fmt_int, fmt_mib, fmt_value, markdown_table, write_csv
from tests.helpers.runs import REPO
from tests.helpers.runs import run as train_in_process
from trainer.config import load_config, save_config
from trainer.flop_budget import config_flops
from trainer.metrics import read_metrics
from trainer.run_outcome import DIVERGED_FILE, mark_diverged

TINY = REPO / "configs" / "tiny.yaml"
MAX_STEPS = 10
TOKENS_PER_STEP = 8 * 256  # configs/tiny.yaml: global_batch 8, seq_len 256
PENDING = None  # a seed that has not run yet
DIVERGED = math.inf


def make_run(root: Path, arm: str, *, entry: str | None = None, lr: float = 1e-3, seed: int = 0, extra=()) -> StudyRun:
    """A run of configs/tiny.yaml (max_steps 10) in root/<arm>/lr<lr>/seed<seed>, lr tuned."""
    run_dir = root / arm.replace(" ", "_").replace("=", "") / f"lr{lr}" / f"seed{seed}"
    overrides = [f"--optim.lr={lr}", f"--run.seed={seed}", f"--train.max_steps={MAX_STEPS}", *extra]
    overrides.append(f"--run.dir={run_dir}")
    return StudyRun(
        entry=entry or arm.split(" ")[0],
        arm=arm,
        seed=seed,
        tuned={"optim.lr": lr},
        config_path=TINY,
        overrides=overrides,
        config=load_config(TINY, overrides),
        run_dir=run_dir,
    )


def write_metrics(
    run: StudyRun,
    val: dict[int, float],
    *,
    last_step: int | None = None,
    state_bytes: float = 1000.0,
    peak_bytes: float = 5000.0,
    tokens_per_s: tuple[float, ...] = (100.0, 300.0, 200.0, 1000.0),
) -> None:
    """Train records for steps 1..last_step (default: the last val step), the val records of `val`, as the
    trainer writes them: the peak grows to `peak_bytes`, the optimizer state settles at `state_bytes`."""
    last = max(val) if last_step is None else last_step
    records = [{"step": 0, "val/loss": val[0]}] if 0 in val else []
    for step in range(1, last + 1):
        records.append(
            {
                "step": step,
                "train/loss": 5.0,
                "throughput/tokens_per_s": tokens_per_s[(step - 1) % len(tokens_per_s)],
                "memory/peak_bytes": peak_bytes * step / last,
                "memory/optimizer_state_bytes": state_bytes if step > 1 else state_bytes / 2,
            }
        )
        if step in val:
            records.append({"step": step, "val/loss": val[step]})
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def finish(run: StudyRun, loss: float | None, **kwargs) -> None:
    """Make the run complete with final val loss `loss`, diverged (inf: a marker at step 7) or pending (None)."""
    if loss is None:
        return
    if loss == math.inf:
        write_metrics(run, {0: 10.0, 5: 6.0}, last_step=6, **kwargs)
        mark_diverged(run.run_dir, 7, "non-finite loss at step 7 (loss nan)\nlikely causes: lr too high")
        return
    write_metrics(run, {0: 10.0, 5: loss + 0.5, MAX_STEPS: loss}, **kwargs)


def arm_results(root: Path, arm: str, losses: dict[float, tuple], *, entry=None, extra=(), **kwargs) -> list[RunResult]:
    """The results of an arm whose setting lr has final losses `losses[lr]` (one per seed 0, 1, ...)."""
    results = []
    for lr, per_seed in losses.items():
        for seed, loss in enumerate(per_seed):
            run = make_run(root, arm, entry=entry, lr=lr, seed=seed, extra=extra)
            finish(run, loss, **kwargs)
            results.append(run_result(run))
    return results


# ----- one run ---------------------------------------------------------------------------------------


def test_a_complete_run_has_its_final_and_best_loss_and_numbers(tmp_path):
    run = make_run(tmp_path, "AdamW")
    write_metrics(run, {0: 10.0, 5: 3.0, MAX_STEPS: 3.5}, state_bytes=4096.0, peak_bytes=8192.0)
    (run.run_dir / FAILED_FILE).write_text('{"exit_code": 1, "message": "an earlier attempt"}')  # stale
    result = run_result(run)
    assert result.status == "complete"
    assert (result.final_val_loss, result.best_val_loss) == (3.5, 3.0)  # final = at max_steps; best = lowest
    assert (result.step, result.max_steps) == (MAX_STEPS, MAX_STEPS)
    assert result.tokens_seen == MAX_STEPS * TOKENS_PER_STEP
    assert result.flops_seen == config_flops(run.config).cumulative(MAX_STEPS) > 0
    assert result.tokens_per_s == 250.0  # the median of 100, 300, 200, 1000, ... over 10 steps: (200 + 300) / 2
    assert result.peak_memory_bytes == 8192.0  # the largest
    assert result.optimizer_state_bytes == 4096.0  # the last (the first step logged half)
    assert result.message == ""


def test_a_diverged_run_is_a_result_with_the_markers_first_line(tmp_path):
    run = make_run(tmp_path, "AdamW")
    finish(run, DIVERGED)
    result = run_result(run)
    assert result.status == "diverged"
    assert result.message == "non-finite loss at step 7 (loss nan)"
    assert result.final_val_loss is None and result.best_val_loss == 6.0
    assert result.step == 6 and result.tokens_seen == 6 * TOKENS_PER_STEP


def test_a_non_finite_final_loss_counts_as_diverged(tmp_path):
    run = make_run(tmp_path, "AdamW")
    write_metrics(run, {0: 10.0, MAX_STEPS: math.nan})
    result = run_result(run)
    assert result.status == "diverged" and "nan" in result.message
    assert result.final_val_loss is None and result.best_val_loss == 10.0


def test_a_failed_run_carries_the_exit_code_and_message(tmp_path):
    run = make_run(tmp_path, "AdamW")
    write_metrics(run, {0: 10.0}, last_step=3)
    (run.run_dir / FAILED_FILE).write_text(json.dumps({"exit_code": 1, "message": "RuntimeError: boom\nmore"}))
    result = run_result(run)
    assert (result.status, result.message) == ("failed", "exit code 1: RuntimeError: boom")
    assert result.step == 3 and result.final_val_loss is None


def test_an_unreadable_failed_marker_still_says_the_run_failed(tmp_path: Path) -> None:
    assert read_failed(tmp_path) is None
    (tmp_path / "failed.json").write_text('{"exit_code": 1, "mess')
    assert read_failed(tmp_path) == {"exit_code": None, "message": f"{tmp_path / 'failed.json'} is unreadable"}


def test_incomplete_and_pending(tmp_path):
    interrupted = make_run(tmp_path, "AdamW", seed=0)
    write_metrics(interrupted, {0: 10.0, 5: 4.0}, last_step=7)
    (interrupted.run_dir / "checkpoints").mkdir()
    (interrupted.run_dir / "checkpoints" / "step_00000005.pt").write_bytes(b"")
    result = run_result(interrupted)
    assert (result.status, result.step, result.final_val_loss, result.best_val_loss) == ("incomplete", 7, None, 4.0)

    never = make_run(tmp_path, "AdamW", seed=1)
    assert run_result(never).status == "pending"
    never.run_dir.mkdir(parents=True)
    (never.run_dir / "train.log").write_text("starting\n")  # started, nothing logged or saved yet
    result = run_result(never)
    assert (result.status, result.step, result.tokens_seen, result.best_val_loss) == ("pending", 0, 0, None)
    assert result.tokens_per_s is None and result.peak_memory_bytes is None and result.optimizer_state_bytes is None


def test_a_damaged_metrics_file_names_the_run_and_the_fix(tmp_path):
    run = make_run(tmp_path, "GaLore rank=8", lr=3e-3, seed=1)
    write_metrics(run, {0: 10.0, MAX_STEPS: 3.0})
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = '{"step": 2, "train/lo\n'  # damage inside the file, not a last line cut short
    (run.run_dir / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(StudyResultsError) as e:
        run_result(run)
    message = str(e.value)
    for part in ("'GaLore rank=8'", "optim.lr=3e-3", "seed 1", str(run.run_dir), "line 3", f"delete {run.run_dir}"):
        assert part in message


def test_a_missing_metrics_file_beside_checkpoints_names_the_run_and_the_fix(tmp_path):
    run = make_run(tmp_path, "AdamW", lr=1e-2)
    (run.run_dir / "checkpoints").mkdir(parents=True)
    (run.run_dir / "checkpoints" / "step_00000005.pt").write_bytes(b"")
    with pytest.raises(StudyResultsError) as e:
        run_result(run)
    message = str(e.value)
    for part in ("'AdamW'", "optim.lr=0.01", "seed 0", "metrics.jsonl is missing", "step_00000005.pt"):
        assert part in message
    assert "Restore metrics.jsonl" in message and f"delete {run.run_dir}" in message


def test_the_reader_matches_what_the_trainer_writes(tmp_path, sample_tokens):
    """A real (seconds-long) run: the keys read here are the ones the trainer logs."""
    extra = {"train.max_steps": 3, "log.tensorboard": False, "checkpoint.interval": 3}
    cfg, trained = train_in_process(tmp_path, sample_tokens, "run", **extra)
    run = StudyRun("AdamW", "AdamW", 0, {"optim.lr": cfg.optim.lr}, TINY, [], cfg, Path(cfg.run.dir))
    result = run_result(run)
    records = read_metrics(run.run_dir / "metrics.jsonl")
    assert (result.status, result.step, result.max_steps) == ("complete", 3, 3)
    assert result.final_val_loss == trained.val_losses[-1][1] == records[-1]["val/loss"]
    assert result.tokens_seen == 3 * cfg.train.global_batch * cfg.data.seq_len
    assert result.flops_seen == max(r["flops_seen"] for r in records if "flops_seen" in r)
    assert result.optimizer_state_bytes == records[-2]["memory/optimizer_state_bytes"] > 0
    assert result.tokens_per_s is not None and result.tokens_per_s > 0
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes > 0


# ----- arms ----------------------------------------------------------------------------------------------


def summarize(results: list[RunResult], seeds=(0, 1)) -> ArmSummary:
    (arm,) = summarize_arms(results, list(seeds))
    return arm


def test_the_best_setting_is_the_lowest_mean_over_seeds_and_each_seed_keeps_its_own(tmp_path):
    # lr 1e-3 has the single best run (3.0) but the worse mean (3.5 > 3.4).
    arm = summarize(arm_results(tmp_path, "AdamW", {1e-3: (3.0, 4.0), 3e-3: (3.4, 3.4), 1e-2: (3.9, 3.8)}))
    assert [s.tuned for s in arm.settings] == [{"optim.lr": 1e-3}, {"optim.lr": 3e-3}, {"optim.lr": 1e-2}]
    assert [s.mean for s in arm.settings] == pytest.approx([3.5, 3.4, 3.85])
    assert arm.best is arm.settings[1] and arm.best.losses == {0: 3.4, 1: 3.4}
    assert arm.best_per_seed == {0: arm.settings[0], 1: arm.settings[1]}
    assert (arm.edge, arm.complete) == ("", True)
    assert lr_curve(arm) == "1e-3: 3.5000 | 3e-3: 3.4000* | 0.01: 3.8500"


def test_a_diverged_setting_is_never_best(tmp_path):
    # Seed 1 at lr 1e-2 is the lowest loss of all, but seed 0 diverged there: the mean is +inf.
    arm = summarize(arm_results(tmp_path, "AdamW", {1e-3: (3.5, 3.5), 3e-3: (3.4, 3.6), 1e-2: (DIVERGED, 2.0)}))
    assert arm.settings[2].mean == math.inf and arm.settings[2].losses == {0: math.inf, 1: 2.0}
    assert arm.best is arm.settings[0]  # 3.5 = 3.5: the first in grid order
    assert arm.best_per_seed[0] is arm.settings[1] and arm.best_per_seed[1] is arm.settings[2]
    assert arm.complete  # a diverged run is a finished result
    assert lr_curve(arm).endswith("0.01: diverged")

    every = summarize(arm_results(tmp_path / "b", "Adafactor", {1e-1: (DIVERGED, DIVERGED), 1.0: (DIVERGED,) * 2}))
    assert every.best is None and every.best_per_seed == {} and every.edge == ""


def test_a_missing_seed_excludes_the_setting_from_the_mean(tmp_path):
    arm = summarize(arm_results(tmp_path, "AdamW", {1e-3: (3.5, 3.5), 3e-3: (2.0, PENDING), 1e-2: (3.6, 3.6)}))
    assert arm.settings[1].mean is None and arm.settings[1].losses == {0: 2.0}
    assert arm.best is arm.settings[0]
    assert arm.best_per_seed[0] is arm.settings[1]  # what a study with seed 0 alone would pick
    assert arm.complete is False
    assert lr_curve(arm) == "1e-3: 3.5000* | 3e-3: partial (seed 0: 2.0000) | 0.01: 3.6000"
    assert summarize(arm_results(tmp_path / "b", "Adafactor", {1e-3: (PENDING, PENDING)})).best is None


@pytest.mark.parametrize(
    "losses,edge",
    [
        ({1e-3: (3.0,), 3e-3: (3.2,), 1e-2: (3.4,)}, "low"),
        ({1e-3: (3.4,), 3e-3: (3.0,), 1e-2: (3.2,)}, ""),
        ({1e-3: (3.4,), 3e-3: (3.2,), 1e-2: (3.0,)}, "high"),
        ({3e-3: (3.0,)}, ""),  # a single lr: no grid to have an edge
    ],
)
def test_edge_flags(tmp_path, losses, edge):
    assert summarize(arm_results(tmp_path, "AdamW", losses), seeds=[0]).edge == edge


def test_the_edge_reads_the_lr_of_the_grid_in_any_order(tmp_path):
    # Written high to low: the edge is about the lr values, not the grid's order.
    arm = summarize(arm_results(tmp_path, "AdamW", {1e-2: (3.4,), 3e-3: (3.2,), 1e-3: (3.0,)}), seeds=[0])
    assert arm.edge == "low"


def test_without_study_seeds_each_run_is_its_own_replicate(tmp_path):
    results = arm_results(tmp_path, "AdamW", {1e-3: (3.5,), 3e-3: (3.4,)})
    (arm,) = summarize_arms(results, [])
    assert arm.best is not None and arm.best.tuned == {"optim.lr": 3e-3} and arm.best.mean == 3.4
    assert arm.best_per_seed == {0: arm.best} and arm.edge == "high"


def test_arms_are_grouped_by_name_in_first_appearance_order(tmp_path):
    a = arm_results(tmp_path, "GaLore rank=8", {1e-3: (3.0,)}, extra=["--optim.name=galore_adamw", "--optim.rank=8"])
    b = arm_results(tmp_path, "AdamW", {1e-3: (3.1,)})
    c = arm_results(tmp_path, "GaLore rank=8", {3e-3: (2.9,)}, extra=["--optim.name=galore_adamw", "--optim.rank=8"])
    arms = summarize_arms(a + b + c, [0])
    assert [(arm.entry, arm.arm, len(arm.runs)) for arm in arms] == [
        ("GaLore", "GaLore rank=8", 2),
        ("AdamW", "AdamW", 1),
    ]
    assert arms[0].best is not None and arms[0].best.mean == 2.9


# ----- a hand-computed study: figure rows, orderings, tables ------------------------------------------

# Final val loss per arm -> lr -> (seed 0, seed 1); optimizer state and peak bytes (seed 1 logs 1 more byte).
ADAFACTOR = ["--optim.name=adafactor"]
GALORE = ["--optim.name=galore_adamw"]
ADAMEM = ["--optim.name=adamem"]
STUDY_ARMS: list[tuple[str, str, list[str], dict[float, tuple], float, float]] = [
    ("AdamW", "AdamW", [], {1e-3: (3.00, 3.20), 3e-3: (2.95, 3.05)}, 800, 1000),
    ("Adafactor", "Adafactor", ADAFACTOR, {1e-3: (3.40, 3.30), 3e-3: (3.20, 3.36)}, 200, 900),
    ("GaLore", "GaLore rank=8", GALORE + ["--optim.rank=8"], {1e-3: (3.50, 3.45), 3e-3: (3.40, 3.60)}, 300, 900),
    ("GaLore", "GaLore rank=32", GALORE + ["--optim.rank=32"], {1e-3: (3.25, 3.35), 3e-3: (3.15, 3.25)}, 500, 1200),
    ("AdaMeM", "AdaMeM rank=8", ADAMEM + ["--optim.rank=8"], {1e-3: (3.25, 3.30), 3e-3: (DIVERGED, 3.00)}, 350, 1300),
    ("AdaMeM", "AdaMeM rank=32", ADAMEM + ["--optim.rank=32"], {1e-3: (3.05, 3.15), 3e-3: (3.00, PENDING)}, 550, 1100),
]
# The best settings (mean): AdamW 3e-3 3.00, Adafactor 3e-3 3.28, GaLore-8 1e-3 3.475, GaLore-32 3e-3 3.20,
# AdaMeM-8 1e-3 3.275 (3e-3 diverged in seed 0), AdaMeM-32 1e-3 3.10 (3e-3 misses seed 1).
FIGURES = [
    FigureSpec(
        name="fig1_rank",
        kind="line",
        x="optim.rank",
        series=["GaLore", "AdaMeM"],
        references={"Adafactor": ["Adafactor"], "Adamw(factor)": ["AdamW", "Adafactor"]},
    ),
    FigureSpec(name="by_rank", kind="line", x="optim.rank", series=["GaLore", "AdaMeM"]),
    FigureSpec(name="rank32", kind="line", x="optim.rank", series=["GaLore"], where={"optim.rank": [32]}),
    FigureSpec(name="ranks", kind="table", rows=["GaLore", "AdamW"], columns="optim.rank"),
    FigureSpec(name="curves", kind="curves", series=["AdamW"]),
    FigureSpec(name="pareto", kind="pareto"),
]


@pytest.fixture
def study(tmp_path) -> tuple[Study, list[RunResult], list[ArmSummary]]:
    runs = []
    for entry, arm, extra, losses, state, peak in STUDY_ARMS:
        for lr, per_seed in losses.items():
            for seed, loss in enumerate(per_seed):
                run = make_run(tmp_path / "runs", arm, entry=entry, lr=lr, seed=seed, extra=extra)
                finish(run, loss, state_bytes=state + seed, peak_bytes=peak + seed)
                runs.append(run)
    s = Study(
        path=tmp_path / "study.yaml",
        name="synthetic",
        out=tmp_path / "out",
        runs=runs,
        figures=FIGURES,
        setup=[],
        seeds=[0, 1],
        entries=["AdamW", "Adafactor", "GaLore", "AdaMeM"],
    )
    results = collect(s)
    return s, results, summarize_arms(results, s.seeds)


def line(series, role, x, mean, lo, hi, seeds, arm, best, entry=None):
    return {
        "series": series,
        "role": role,
        "x": x,
        "loss_mean": pytest.approx(mean) if mean is not None else None,
        "loss_min": lo,
        "loss_max": hi,
        "seeds": seeds,
        "arm": arm,
        "entry": series if entry is None else entry,
        "best": best,
    }


def test_figure_rows_of_every_kind(study):
    s, results, arms = study
    assert [r.status for r in results].count("diverged") == 1 and [r.status for r in results].count("pending") == 1
    fig1, by_rank, rank32, table, curves, pareto = figure_data(s, arms)

    assert fig1.columns == ["series", "role", "x", "loss_mean", "loss_min", "loss_max", "seeds", "arm", "entry", "best"]
    assert fig1.rows == [
        line("GaLore", "line", 8, 3.475, 3.45, 3.50, 2, "GaLore rank=8", "optim.lr=1e-3"),
        line("GaLore", "line", 32, 3.20, 3.15, 3.25, 2, "GaLore rank=32", "optim.lr=3e-3"),
        line("AdaMeM", "line", 8, 3.275, 3.25, 3.30, 2, "AdaMeM rank=8", "optim.lr=1e-3"),
        line("AdaMeM", "line", 32, 3.10, 3.05, 3.15, 2, "AdaMeM rank=32", "optim.lr=1e-3"),
        line("Adafactor", "reference", None, 3.28, 3.20, 3.36, 2, "Adafactor", "optim.lr=3e-3"),
        line("Adamw(factor)", "reference", None, 3.00, 2.95, 3.05, 2, "AdamW", "optim.lr=3e-3", entry="AdamW"),
    ]
    assert all(list(row) == fig1.columns for row in fig1.rows)
    assert by_rank.rows == fig1.rows[:4]
    assert rank32.rows == [fig1.rows[1]]  # `where` keeps rank 32 only

    assert table.columns == ["entry", "optim.rank=8", "optim.rank=32", "optim.rank=128"]  # AdamW: the default 128
    assert [list(row.values()) for row in table.rows] == [
        ["GaLore", pytest.approx(3.475), pytest.approx(3.20), None],
        ["AdamW", None, None, pytest.approx(3.00)],
    ]
    assert all(list(row) == table.columns for row in table.rows)

    assert curves.columns == ["arm", "entry", "seed", "step", "tokens", "flops", "val_loss"]
    flops = config_flops(arms[0].runs[0].run.config)
    assert [list(row.values()) for row in curves.rows] == [
        ["AdamW", "AdamW", seed, step, step * TOKENS_PER_STEP, flops.cumulative(step), loss]
        for seed, final in ((0, 2.95), (1, 3.05))
        for step, loss in ((0, 10.0), (5, final + 0.5), (MAX_STEPS, final))
    ]
    assert all(list(row) == curves.columns for row in curves.rows)
    assert all(f.entries == ["AdamW", "Adafactor", "GaLore", "AdaMeM"] for f in (fig1, table, curves, pareto))

    assert pareto.columns == [
        "arm",
        "entry",
        "optimizer_state_bytes",
        "peak_memory_bytes",
        "loss_mean",
        "frontier_state",
        "frontier_peak",
    ]
    got = {r["arm"]: tuple(list(r.values())[2:4] + list(r.values())[5:]) for r in pareto.rows}
    assert got == {  # bytes: the max over seeds (seed 1's); frontier by hand from the losses above
        "AdamW": (801, 1001, True, True),
        "Adafactor": (201, 901, True, True),  # GaLore-8 has equal peak bytes but a higher loss
        "GaLore rank=8": (301, 901, False, False),  # Adafactor: fewer / equal bytes, lower loss
        "GaLore rank=32": (501, 1201, True, False),
        "AdaMeM rank=8": (351, 1301, True, False),
        "AdaMeM rank=32": (551, 1101, True, False),
    }
    assert [r["loss_mean"] for r in pareto.rows] == pytest.approx([3.00, 3.28, 3.475, 3.20, 3.275, 3.10])


def test_orderings_say_where_each_seed_agrees(study):
    s, _, arms = study
    lines = orderings(s, arms)
    edge = "best lr at the grid's edge"
    caveats_adamem_adafactor = (
        f"; caveats: AdaMeM rank=8 ({edge}: low), AdaMeM rank=32 ({edge}: low, incomplete), Adafactor ({edge}: high)"
    )
    assert lines[:4] == [
        f"fig1_rank: GaLore < Adafactor at rank 32 (not at 8); seed 0: 32; seed 1: 32; caveats: GaLore rank=8 "
        f"({edge}: low), GaLore rank=32 ({edge}: high), Adafactor ({edge}: high)",
        f"fig1_rank: GaLore < Adamw(factor) at no rank (tried 8, 32); seed 0: none; seed 1: none; caveats: GaLore "
        f"rank=8 ({edge}: low), GaLore rank=32 ({edge}: high), AdamW ({edge}: high), Adafactor ({edge}: high)",
        # Seed 0 alone: AdaMeM-8's 3.25 loses to Adafactor's 3.20 (its own best, lr 3e-3).
        "fig1_rank: AdaMeM < Adafactor at rank 8, 32 (every rank); seed 0: 32; seed 1: every rank"
        + caveats_adamem_adafactor,
        # Seed 1 alone: AdaMeM-8's own best (3e-3: 3.00) beats AdamW's 3.05.
        f"fig1_rank: AdaMeM < Adamw(factor) at no rank (tried 8, 32); seed 0: none; seed 1: 8; caveats: AdaMeM rank=8 "
        f"({edge}: low), AdaMeM rank=32 ({edge}: low, incomplete), AdamW ({edge}: high), Adafactor ({edge}: high)",
    ]
    assert lines[4:6] == [
        f"by_rank at rank 8: AdaMeM (3.2750) < GaLore (3.4750); seed 0: same order; seed 1: same order; caveats: "
        f"GaLore rank=8 ({edge}: low), AdaMeM rank=8 ({edge}: low)",
        f"by_rank at rank 32: AdaMeM (3.1000) < GaLore (3.2000); seed 0: same order; seed 1: same order; caveats: "
        f"GaLore rank=32 ({edge}: high), AdaMeM rank=32 ({edge}: low, incomplete)",
    ]
    assert lines[6] == (
        "rank32 at rank 32: GaLore (3.2000); seed 0: same order; seed 1: same order; caveats: GaLore rank=32 "
        f"({edge}: high)"
    )
    assert lines[7] == (
        f"all arms by mean final val loss of their best setting: AdamW (3.0000, {edge}: high) < AdaMeM rank=32 "
        f"(3.1000, {edge}: low, incomplete) < GaLore rank=32 (3.2000, {edge}: high) < AdaMeM rank=8 (3.2750, "
        f"{edge}: low) < Adafactor (3.2800, {edge}: high) < GaLore rank=8 (3.4750, {edge}: low); "
        "seed 0: 1 pair(s) swap (AdaMeM rank=8 / Adafactor); "
        "seed 1: 3 pair(s) swap (AdamW / AdaMeM rank=8, AdaMeM rank=32 / AdaMeM rank=8, GaLore rank=32 / AdaMeM rank=8)"
    )
    assert len(lines) == 8


def test_an_order_line_shows_a_seed_that_disagrees(tmp_path):
    runs = []
    for arm, extra, losses in (
        ("Adafactor", ["--optim.name=adafactor"], (3.0, 3.3)),
        ("Adafactor+momentum", ["--optim.name=adafactor"], (3.1, 3.1)),
    ):
        run_list = [make_run(tmp_path, arm, seed=seed, extra=extra) for seed in (0, 1)]
        for run, loss in zip(run_list, losses, strict=True):
            finish(run, loss)
        runs += run_list
    figure = FigureSpec(name="fig3_batch", kind="line", x="train.global_batch")
    s = Study(
        tmp_path / "s.yaml", "s", tmp_path / "out", runs, [figure], [], [0, 1], ["Adafactor", "Adafactor+momentum"]
    )
    arms = summarize_arms(collect(s), s.seeds)
    assert orderings(s, arms)[0] == (
        "fig3_batch at global_batch 8: Adafactor+momentum (3.1000) < Adafactor (3.1500); seed 0: Adafactor < "
        "Adafactor+momentum; seed 1: same order"
    )
    # One seed: no per-seed parts (they would repeat the means).
    one = Study(tmp_path / "s.yaml", "s", tmp_path / "out", runs[::2], [figure], [], [0], s.entries)
    assert orderings(one, summarize_arms(collect(one), one.seeds)) == [
        "fig3_batch at global_batch 8: Adafactor (3.0000) < Adafactor+momentum (3.1000)",
        "all arms by mean final val loss of their best setting: Adafactor (3.0000) < Adafactor+momentum (3.1000)",
    ]


def test_a_seed_without_results_is_not_said_to_agree(tmp_path):
    """Halfway through a study run seed by seed: seed 1 has nothing yet, so it must not read as agreeing."""
    runs = []
    for arm, loss in (("Adafactor", 3.0), ("Adafactor+momentum", 3.1)):
        run_list = [make_run(tmp_path, arm, seed=seed, extra=["--optim.name=adafactor"]) for seed in (0, 1)]
        finish(run_list[0], loss)  # seed 1 pending
        runs += run_list
    figure = FigureSpec(name="fig3_batch", kind="line", x="train.global_batch")
    s = Study(
        tmp_path / "s.yaml", "s", tmp_path / "out", runs, [figure], [], [0, 1], ["Adafactor", "Adafactor+momentum"]
    )
    lines = orderings(s, summarize_arms(collect(s), s.seeds))
    assert lines[0].startswith(
        "fig3_batch at global_batch 8: no finished result; no result: Adafactor, Adafactor+momentum; seed 0: "
        "Adafactor < Adafactor+momentum; seed 1: no finished result"
    )
    assert "seed 0: no mean to compare with; seed 1: no finished result" in lines[1]
    assert "same" not in " ".join(lines)


def test_a_reference_without_results_is_said_so(tmp_path):
    adamem = make_run(tmp_path, "AdaMeM rank=8", extra=["--optim.name=adamem", "--optim.rank=8"])
    finish(adamem, 3.0)
    adafactor = make_run(tmp_path, "Adafactor", extra=["--optim.name=adafactor"])  # pending
    figure = FigureSpec(
        name="fig1", kind="line", x="optim.rank", series=["AdaMeM"], references={"Adafactor": ["Adafactor"]}
    )
    s = Study(
        tmp_path / "s.yaml", "s", tmp_path / "out", [adamem, adafactor], [figure], [], [], ["AdaMeM", "Adafactor"]
    )
    arms = summarize_arms(collect(s), s.seeds)
    assert figure_data(s, arms)[0].rows[-1] == line(
        "Adafactor", "reference", None, None, None, None, 0, "", "", entry=""
    )
    assert orderings(s, arms) == [
        "fig1: AdaMeM < Adafactor: no finished Adafactor result to compare with; caveats: Adafactor (no finished "
        "setting, incomplete)",
        "all arms by mean final val loss of their best setting: AdaMeM rank=8 (3.0000); no finished setting: Adafactor",
    ]


def test_write_tables(study):
    s, results, arms = study
    figures = figure_data(s, arms)
    paths = write_tables(s, results, arms, figures)
    results_dir, figures_dir = s.out / "results", s.out / "figures"
    expected = [results_dir / f"{n}.{e}" for n in ("runs", "arms") for e in ("csv", "md")]
    expected += [figures_dir / f"{f.spec.name}.{e}" for f in figures for e in ("csv", "md")]
    assert paths == expected and all(p.is_file() for p in paths)

    with open(results_dir / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == len(s.runs) == 24
    assert list(runs[0])[:4] == ["entry", "arm", "seed", "optim.lr"]
    diverged = next(r for r in runs if r["status"] == "diverged")
    assert (diverged["arm"], diverged["seed"], diverged["final_val_loss"]) == ("AdaMeM rank=8", "0", "")
    assert diverged["message"] == "non-finite loss at step 7 (loss nan)"
    assert (runs[0]["final_val_loss"], runs[0]["optimizer_state_bytes"], runs[0]["run_dir"]) == (
        "3.0",
        "800.0",
        str(s.runs[0].run_dir),
    )

    with open(results_dir / "arms.csv", newline="") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f)}
    assert rows["AdaMeM rank=8"]["lr_curve"] == "1e-3: 3.2750* | 3e-3: diverged"
    assert rows["AdaMeM rank=32"]["lr_curve"] == "1e-3: 3.1000* | 3e-3: partial (seed 0: 3.0000)"
    assert (rows["AdaMeM rank=32"]["edge"], rows["AdaMeM rank=32"]["complete"]) == ("low", "False")
    assert (rows["AdaMeM rank=32"]["seed 0"], rows["AdaMeM rank=32"]["finished"]) == ("3.05", "3/4")
    assert rows["Adafactor"]["best_per_seed"] == "seed 0: optim.lr=3e-3; seed 1: optim.lr=1e-3"

    md = (results_dir / "runs.md").read_text().splitlines()
    assert md[0] == "# synthetic: runs" and md[2].startswith("| entry | arm | seed | optim.lr | status |")
    assert md[3].startswith("|---|") and md[4].startswith("| AdamW | AdamW | 0 | 1e-3 | complete | 3.0000 | 3.0000 |")
    assert "| 10/10 | 20,480 |" in md[4] and "| 0.00 | " in md[4]  # 800 bytes of optimizer state: 0.00 MiB
    pareto_md = (figures_dir / "pareto.md").read_text()
    assert (
        "| optimizer_state_bytes (MiB) |" in pareto_md
        and "| AdamW | AdamW | 0.00 | 0.00 | 3.0000 | yes | yes |" in pareto_md
    )
    fig1_md = (figures_dir / "fig1_rank.md").read_text()
    assert "| GaLore | line | 8 | 3.4750 | 3.4500 | 3.5000 | 2 | GaLore rank=8 | GaLore | optim.lr=1e-3 |" in fig1_md
    with open(figures_dir / "ranks.csv", newline="") as f:
        assert list(csv.reader(f))[2] == ["AdamW", "", "", "3.0"]


def test_a_run_trained_with_other_settings_than_the_studys_is_an_error_not_its_result(tmp_path):
    """A run directory is named by the tuned values and the seed: after an edit of a fixed override (here weight
    decay and max_steps), its old losses must not count as the new setting's. How it ran (micro-batching, device,
    intervals) may differ."""
    old = make_run(tmp_path, "AdamW", extra=["--optim.weight_decay=0.3", "--train.max_steps=20"])
    write_metrics(old, {0: 9.0, 10: 6.0, 20: 5.0})
    save_config(old.config, Path(old.run_dir) / "config.yaml")  # as the trainer writes it at each start
    now = make_run(tmp_path, "AdamW")  # the same directory: weight decay 0.01 (the config's), max_steps 10
    assert now.run_dir == old.run_dir
    with pytest.raises(StudyResultsError, match=r"was trained with other settings than the study's") as e:
        run_result(now)
    assert "optim.weight_decay: 0.3 in the run, 0.01 in the study" in str(e.value)
    assert "train.max_steps: 20 in the run, 10 in the study" in str(e.value) and "Delete" in str(e.value)
    how = make_run(tmp_path, "AdamW", extra=["--train.micro_batch=4", "--eval.interval=5", "--log.interval=1"])
    save_config(how.config, Path(how.run_dir) / "config.yaml")
    assert run_result(now).status == "complete"  # the same computation, run another way


def test_an_unfinished_or_failed_run_adds_nothing_to_its_settings_mean(tmp_path):
    """Seed 1 of lr 3e-3 is still running and seed 1 of lr 1e-2 failed, both after logging a val loss of 2.0
    (lower than any final one): neither is a final loss, so neither setting has a mean or can be best."""
    results = arm_results(tmp_path, "AdamW", {1e-3: (3.5, 3.5)})
    for lr, failed in ((3e-3, False), (1e-2, True)):
        done, unfinished = make_run(tmp_path, "AdamW", lr=lr, seed=0), make_run(tmp_path, "AdamW", lr=lr, seed=1)
        finish(done, 3.0)
        write_metrics(unfinished, {0: 10.0, 5: 2.0}, last_step=6)
        if failed:
            (unfinished.run_dir / FAILED_FILE).write_text(json.dumps({"exit_code": 1, "message": "boom"}))
        results += [run_result(done), run_result(unfinished)]
    assert [r.status for r in results[2:]] == ["complete", "incomplete", "complete", "failed"]
    arm = summarize(results)
    assert [(s.losses, s.mean) for s in arm.settings] == [({0: 3.5, 1: 3.5}, 3.5), ({0: 3.0}, None), ({0: 3.0}, None)]
    assert arm.best is arm.settings[0]
    assert arm.best_per_seed == {0: arm.settings[1], 1: arm.settings[0]}


@pytest.mark.parametrize(
    "losses",
    [
        {1e-3: (3.4,), 3e-3: (3.0,), 1e-2: (DIVERGED,)},  # the lr above the best diverged: the grid reached far enough
        {1e-4: (PENDING,), 1e-3: (3.0,), 3e-3: (3.2,)},  # the lr below the best has not run yet: still tried
    ],
)
def test_the_edge_counts_every_lr_of_the_arm_whatever_its_status(tmp_path, losses):
    assert summarize(arm_results(tmp_path, "AdamW", losses), seeds=[0]).edge == ""


def two_seed_study(tmp_path, arms, figures):
    """A Study of single-lr arms: (arm name, extra overrides, (seed 0 loss, seed 1 loss)); entry = first word."""
    runs = []
    for arm, extra, per_seed in arms:
        for seed, loss in enumerate(per_seed):
            run = make_run(tmp_path, arm, seed=seed, extra=extra)
            finish(run, loss)
            runs.append(run)
    entries = list(dict.fromkeys(arm.split(" ")[0] for arm, _, _ in arms))
    s = Study(tmp_path / "s.yaml", "s", tmp_path / "out", runs, figures, [], [0, 1], entries)
    return s, summarize_arms(collect(s), s.seeds)


def test_a_seeds_reference_value_is_the_best_of_the_references_arms(tmp_path):
    """Reference "Best" = AdamW or Adafactor. Seed 0 alone: Adafactor's 3.0 beats AdaMeM's 3.1, although the
    reference's first arm (AdamW, 3.3) would not."""
    figure = FigureSpec(
        name="fig", kind="line", x="optim.rank", series=["AdaMeM"], references={"Best": ["AdamW", "Adafactor"]}
    )
    s, arms = two_seed_study(
        tmp_path,
        [
            ("AdamW", [], (3.3, 3.0)),
            ("Adafactor", ["--optim.name=adafactor"], (3.0, 3.4)),
            ("AdaMeM rank=8", ["--optim.name=adamem", "--optim.rank=8"], (3.1, 3.1)),
        ],
        [figure],
    )
    # means: AdamW 3.15 (the reference), Adafactor 3.2, AdaMeM 3.1; per seed the reference is min(AdamW, Adafactor)
    assert orderings(s, arms)[0] == "fig: AdaMeM < Best at rank 8 (every rank); seed 0: none; seed 1: none"


def test_a_tie_in_one_seed_is_not_a_swap(tmp_path):
    """_swaps: strictly better on the means and strictly worse in the seed; equal in the seed is no swap."""
    s, arms = two_seed_study(
        tmp_path, [("AdamW", [], (3.0, 3.2)), ("Adafactor", ["--optim.name=adafactor"], (3.2, 3.2))], []
    )
    assert orderings(s, arms) == [
        "all arms by mean final val loss of their best setting: AdamW (3.1000) < Adafactor (3.2000); "
        "seed 0: same ranking; seed 1: same ranking"
    ]


def test_a_divergence_marker_wins_over_a_stale_failed_marker(tmp_path: Path) -> None:
    """A run that failed once (failed.json left, e.g. restarted by a SLURM array, which does not remove it) and
    then diverged is diverged: a result, not a failure to run again."""
    run = make_run(tmp_path, "AdamW")
    finish(run, DIVERGED)
    (run.run_dir / FAILED_FILE).write_text(json.dumps({"exit_code": 1, "message": "an earlier attempt"}))
    assert (run.run_dir / DIVERGED_FILE).is_file()
    result = run_result(run)
    assert (result.status, result.message) == ("diverged", "non-finite loss at step 7 (loss nan)")


@pytest.mark.parametrize(
    "how", ["--data.prepared_dir=.cache/tokens/elsewhere", "--train.compile=true", "--checkpoint.interval=7"]
)
def test_where_the_data_lives_and_how_it_was_compiled_or_saved_may_differ(tmp_path: Path, how: str) -> None:
    """HOW_IT_RAN: data.prepared_dir, train.compile and checkpoint.* change nothing the run computes."""
    run = make_run(tmp_path, "AdamW")
    finish(run, 3.0)
    other = make_run(tmp_path, "AdamW", extra=[how])
    assert other.run_dir == run.run_dir and other.config != run.config
    save_config(other.config, Path(run.run_dir) / "config.yaml")
    result = run_result(run)
    assert (result.status, result.final_val_loss) == ("complete", 3.0)


def test_the_curve_names_each_setting_by_every_tuned_key_when_more_than_one_is_tuned(tmp_path: Path) -> None:
    results = []
    for lr, loss in ((1e-3, 3.5), (3.16e-3, 3.25)):
        run = make_run(tmp_path, "AdamW", lr=lr, extra=["--optim.weight_decay=0.1"])
        finish(run, loss)
        results.append(run_result(replace(run, tuned={"optim.lr": lr, "optim.weight_decay": 0.1})))
    arm = summarize(results, seeds=[0])
    assert (
        lr_curve(arm)
        == "optim.lr=1e-3, optim.weight_decay=0.1: 3.5000 | optim.lr=3.16e-3, optim.weight_decay=0.1: 3.2500*"
    )


def test_a_tie_on_the_means_is_an_equal_sign_and_not_lower(tmp_path: Path) -> None:
    """Means AdamW 3.1 = Adafactor 3.1 = AdaMeM 3.1: no arm is below another, on the means or at any x; per seed,
    the seeds disagree."""
    figures = [
        FigureSpec(name="fig", kind="line", x="optim.rank", series=["AdaMeM"], references={"AdamW": ["AdamW"]}),
        FigureSpec(name="batch", kind="line", x="train.global_batch", series=["AdamW", "Adafactor"]),
    ]
    s, arms = two_seed_study(
        tmp_path,
        [
            ("AdamW", [], (3.0, 3.2)),
            ("Adafactor", ["--optim.name=adafactor"], (3.2, 3.0)),
            ("AdaMeM rank=8", ["--optim.name=adamem", "--optim.rank=8"], (3.1, 3.1)),
        ],
        figures,
    )
    assert orderings(s, arms) == [
        "fig: AdaMeM < AdamW at no rank (tried 8); seed 0: none; seed 1: every rank",
        "batch at global_batch 8: AdamW (3.1000) = Adafactor (3.1000); seed 0: same order; seed 1: Adafactor < AdamW",
        "all arms by mean final val loss of their best setting: AdamW (3.1000) = Adafactor (3.1000) = AdaMeM rank=8 "
        "(3.1000); seed 0: same ranking; seed 1: same ranking",
    ]


def test_a_series_lower_at_every_finished_x_but_missing_one_is_not_every_x(tmp_path: Path) -> None:
    figure = FigureSpec(name="fig", kind="line", x="optim.rank", series=["AdaMeM"], references={"AdamW": ["AdamW"]})
    s, arms = two_seed_study(
        tmp_path,
        [
            ("AdamW", [], (3.2, 3.2)),
            ("AdaMeM rank=8", ["--optim.name=adamem", "--optim.rank=8"], (3.0, 3.0)),
            ("AdaMeM rank=32", ["--optim.name=adamem", "--optim.rank=32"], (PENDING, PENDING)),
        ],
        [figure],
    )
    assert orderings(s, arms)[0] == (
        "fig: AdaMeM < AdamW at rank 8; no result at rank 32; seed 0: 8 (no result at 32); seed 1: 8 (no result at "
        "32); caveats: AdaMeM rank=32 (no finished setting, incomplete)"
    )


def test_an_arm_in_both_the_series_and_the_reference_is_one_caveat(tmp_path: Path) -> None:
    """Each rank of GaLore against GaLore's best: its arms are points of the series and the reference's candidates,
    and their caveats are listed once."""
    figure = FigureSpec(
        name="fig", kind="line", x="optim.rank", series=["GaLore"], references={"GaLore best": ["GaLore"]}
    )
    galore = ["--optim.name=galore_adamw"]
    runs = []
    for arm, extra, losses in (
        ("GaLore rank=8", [*galore, "--optim.rank=8"], {1e-3: (3.0, 3.0)}),
        ("GaLore rank=32", [*galore, "--optim.rank=32"], {1e-3: (3.1, 3.1), 3e-3: (PENDING, PENDING)}),
    ):
        for lr, per_seed in losses.items():
            for seed, loss in enumerate(per_seed):
                run = make_run(tmp_path, arm, lr=lr, seed=seed, extra=extra)
                finish(run, loss)
                runs.append(run)
    s = Study(tmp_path / "s.yaml", "s", tmp_path / "out", runs, [figure], [], [0, 1], ["GaLore"])
    arms = summarize_arms(collect(s), s.seeds)
    assert orderings(s, arms)[0] == (
        "fig: GaLore < GaLore best at no rank (tried 8, 32); seed 0: none; seed 1: none; caveats: GaLore rank=32 "
        "(best lr at the grid's edge: low, incomplete)"
    )


def test_table_cells_are_formatted_for_readers() -> None:
    assert [fmt_value(v) for v in (3.16e-3, 1e-3, 0.01, 0.95, 1e4, 256, True, False)] == [
        "3.16e-3",
        "1e-3",
        "0.01",
        "0.95",
        "1e4",
        "256",
        "true",
        "false",
    ]
    assert (fmt_mib(3 * 1024 * 1024), fmt_mib(1536 * 1024), fmt_mib(None)) == ("3.00", "1.50", "")
    assert (fmt_int(249.6), fmt_int(1000.4), fmt_int(None)) == ("250", "1000", "")
    # A | inside a cell (lr_curve's separator) is escaped and a newline is a space, so the table keeps its columns.
    assert markdown_table(["a", "b"], [["1e-3: 3.5 | 3e-3: 3.4", "x\ny"]]) == (
        "| a | b |\n|---|---|\n| 1e-3: 3.5 \\| 3e-3: 3.4 | x y |\n"
    )


def test_the_tables_columns_hold_their_own_values(study: tuple[Study, list[RunResult], list[ArmSummary]]) -> None:
    s, results, arms = study
    write_tables(s, results, arms, figure_data(s, arms))
    results_dir, figures_dir = s.out / "results", s.out / "figures"
    with open(results_dir / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    # AdamW lr 1e-3 seed 0: tokens/s the median of 100, 300, 200, 1000, ... (250); peak 800 + 200 bytes + seed 0.
    assert (runs[0]["tokens_per_s"], runs[0]["peak_memory_bytes"]) == ("250.0", "1000.0")
    pending = [line for line in (results_dir / "runs.md").read_text().splitlines() if "| pending |" in line]
    assert len(pending) == 1 and "| 0/10 |" in pending[0]  # AdaMeM rank=32, lr 3e-3, seed 1: not started

    with open(results_dir / "arms.csv", newline="") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f)}
    # AdamW's best is lr 3e-3 (the second setting): its seeds' losses, not lr 1e-3's (3.0, 3.2).
    assert (rows["AdamW"]["best"], rows["AdamW"]["seed 0"], rows["AdamW"]["seed 1"]) == (
        "optim.lr=3e-3",
        "2.95",
        "3.05",
    )
    assert rows["AdaMeM rank=8"]["finished"] == "4/4"  # 3 complete and 1 diverged: all finished
    arms_md = (results_dir / "arms.md").read_text()
    assert "| 1e-3: 3.2750* \\| 3e-3: diverged |" in arms_md  # AdaMeM rank=8's curve in one cell

    ranks_md = (figures_dir / "ranks.md").read_text().splitlines()
    assert ranks_md[2:] == [
        "| entry | optim.rank=8 | optim.rank=32 | optim.rank=128 |",
        "|---|---|---|---|",
        "| GaLore | 3.4750 | 3.2000 |  |",
        "| AdamW |  |  | 3.0000 |",
    ]


def test_the_arms_table_has_a_column_per_study_seed_before_any_arm_finished(tmp_path: Path) -> None:
    s, arms = two_seed_study(tmp_path, [("AdamW", [], (PENDING, PENDING))], [])
    write_tables(s, collect(s), arms, [])
    with open(s.results_dir / "arms.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:6] == ["entry", "arm", "best", "mean_final_val_loss", "seed 0", "seed 1"]


def test_line_x_ascends_and_pareto_skips_unfinished_arms_places_none_without_bytes_and_keeps_loss_ties(
    tmp_path: Path,
) -> None:
    """Hand-computed: GaLore's arms listed rank 32 first still give x = 8, 32; the pending AdaMeM arm has no pareto
    row; GaLore rank=8 never logged memory (bytes None: off both frontiers, hiding nothing); Adafactor ties AdamW's
    loss with fewer bytes, which does not push AdamW off the frontier (only a lower loss does)."""
    arms = [  # (arm, extra, per-seed losses, state bytes, peak bytes)
        ("GaLore rank=32", ["--optim.name=galore_adamw", "--optim.rank=32"], (3.2, 3.2), 500.0, 1200.0),
        ("GaLore rank=8", ["--optim.name=galore_adamw", "--optim.rank=8"], (3.5, 3.5), 300.0, 900.0),
        ("AdamW", [], (3.0, 3.0), 800.0, 1000.0),
        ("Adafactor", ["--optim.name=adafactor"], (3.0, 3.0), 200.0, 900.0),
        ("AdaMeM rank=8", ["--optim.name=adamem", "--optim.rank=8"], (PENDING, PENDING), 100.0, 100.0),
    ]
    runs = []
    for arm, extra, per_seed, state, peak in arms:
        for seed, loss in enumerate(per_seed):
            run = make_run(tmp_path, arm, seed=seed, extra=extra)
            finish(run, loss, state_bytes=state, peak_bytes=peak)
            if arm == "GaLore rank=8":  # a run that logged no memory
                records = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
                kept = [{k: v for k, v in r.items() if not k.startswith("memory/")} for r in records]
                (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
            runs.append(run)
    figures = [
        FigureSpec(name="by_rank", kind="line", x="optim.rank", series=["GaLore"]),
        FigureSpec(name="pareto", kind="pareto"),
    ]
    entries = ["GaLore", "AdamW", "Adafactor", "AdaMeM"]
    s = Study(tmp_path / "s.yaml", "s", tmp_path / "out", runs, figures, [], [0, 1], entries)
    by_rank, pareto = figure_data(s, summarize_arms(collect(s), s.seeds))
    assert [(r["x"], r["arm"]) for r in by_rank.rows] == [(8, "GaLore rank=8"), (32, "GaLore rank=32")]
    assert [list(r.values()) for r in pareto.rows] == [
        ["GaLore rank=32", "GaLore", 500.0, 1200.0, pytest.approx(3.2), False, False],
        ["GaLore rank=8", "GaLore", None, None, pytest.approx(3.5), False, False],
        ["AdamW", "AdamW", 800.0, 1000.0, pytest.approx(3.0), True, True],
        ["Adafactor", "Adafactor", 200.0, 900.0, pytest.approx(3.0), True, True],
    ]


@pytest.mark.parametrize(
    "marker,message",
    [("{not json", "{run_dir}/diverged.json is unreadable"), ('"nan at step 7"', "nan at step 7")],
    ids=["unreadable", "not-an-object"],
)
def test_a_damaged_divergence_marker_still_says_the_run_diverged(tmp_path: Path, marker: str, message: str) -> None:
    """diverged.json that is not JSON, or JSON but not an object: still a diverged run (not incomplete, not a
    crash), with a message naming the file or holding the marker's text."""
    run = make_run(tmp_path, "AdamW")
    write_metrics(run, {0: 10.0, 5: 6.0}, last_step=6)
    (run.run_dir / DIVERGED_FILE).write_text(marker)
    result = run_result(run)
    assert (result.status, result.message) == ("diverged", message.format(run_dir=run.run_dir))


def test_a_table_write_cut_short_leaves_the_previous_table(tmp_path: Path) -> None:
    """A --collect stopped (Ctrl-C, an error) while a table's rows are produced keeps the last whole table, never
    a truncated one that a reader would take for the results; a finished write replaces it."""
    path = write_csv(tmp_path / "runs.csv", ["arm", "loss"], [["AdamW", 3.5]])
    before = path.read_bytes()

    def rows_then_interrupt():
        yield ["AdamW", 3.4]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_csv(path, ["arm", "loss"], rows_then_interrupt())
    assert path.read_bytes() == before == b"arm,loss\r\nAdamW,3.5\r\n"
    write_csv(path, ["arm", "loss"], [["AdamW", 3.4]])
    assert list(csv.reader(path.read_text().splitlines())) == [["arm", "loss"], ["AdamW", "3.4"]]
    assert [p.name for p in tmp_path.iterdir()] == ["runs.csv"]  # no temporary file left
