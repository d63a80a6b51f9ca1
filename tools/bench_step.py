"""Whole training steps per optimizer, side by side with AdamW in the same process: what each method
costs where users run it.

    python tools/bench_step.py --flavor 210m --optim adamw galore_adamw adamem adafactor adalomo   # GPU
    python tools/bench_step.py --flavor tiny --seq-len 128 --micro-batch 8                         # CPU
    python tools/bench_step.py --flavor 550m --compile --compile-optim --micro-batch 32 --steps 20
    python tools/bench_step.py --flavor 210m --micro-batch 64 --accumulate 16    # configs/210m.yaml's global batch

Each optimizer trains the real trainer (trainer.Trainer: the sample corpus, the model, the update
strategy, bf16 autocast on CUDA) for `--warmup` steps, then `--steps` timed steps as the trainer runs them (no
device synchronisation inside a step, so on a GPU the host's work overlaps the device's: the step time users
get), then `--steps` more, each timed in three parts with a device synchronisation between them: data wait (the
next batch), forward + backward (fused updates happen inside it), and the rest of the update (clip + step;
ZeRO's step). The parts add up to the serial time, which can exceed the step time on a GPU. Per optimizer it
prints, as a markdown table whose first column is the step time relative to AdamW's (measured first; without
AdamW, the first optimizer's), a row as soon as each optimizer is measured (the trainers' own lines go to stderr):
- tokens/s and MFU (GPU: the trainer's FLOP count over the bf16 dense peak), both from the step time with
  GaLore's / AdaMeM's SVD amortised (below), as a run's wall time gives them;
- the mean step time and the median of its three parts;
- GaLore / AdaMeM: the step time with the SVD amortised at T = optim.update_proj_gap (a refresh step is
  timed separately, the mean of up to 3 after 1: `--steps` steady steps use T = 10**9);
- peak memory: measured (`torch.cuda.max_memory_allocated` over the steady steps, with the trainers measured
  before freed; on CPU none is measured; a refresh step's SVD workspace is not in it), accounted by
  trainer/memory_accounting.py on the meta device (fp32 activations: under bf16 autocast the measured
  activations are about half) and the naive formula (weights + gradients + state + activations);
- host syncs per steady step (trainer/host_syncs.py; the target is 0).
Optimizers run with the paper configs' settings: GaLore / AdaMeM at rank d/4 (GaLore's LLaMA runs),
AdaLomo fused in backward (its method), the others ordinary; `--fused` names more to fuse. `--compile`
compiles the blocks (train.compile), `--compile-optim` the updates of the optimizers that read optim.compile
(Adafactor, AdaLomo, AdaMeM's full-space matrices: optim/compiled_steps.py).
A step is one micro-batch unless `--accumulate K` makes it K (train.global_batch = K x micro-batch, as the
configs' steps are: 16 x 64 for 210m). One micro-batch is the strictest ratio (the update's cost over the least
computation); K shows what a run with the configs' batch pays. The accounted peak is one micro-batch's, and
with K > 1 a fused row is accounted as ordinary: the gradients of the first K - 1 micro-batches stay until
the last one's backward (optim/in_backward.py), so fusing saves no gradient memory there.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from data import DataError
from data.paths import sample_tokens_dir
from model import ModelConfig
from optim.registry import optimizer_keys
from trainer.config import Config, load_config
from trainer.distributed import DistInfo, init_distributed
from trainer.flag_parser import FlagParser
from trainer.hardware import device_peak_flops
from trainer.host_syncs import count_host_syncs
from trainer.memory_accounting import measure
from trainer.trainer import Trainer

GiB = 2**30
OPTIMIZERS = ("adamw", "adafactor", "galore_adamw", "adamem", "adalomo")
LOW_RANK = ("galore_adamw", "galore_adafactor", "adamem")
PAPER_T = 200  # GaLore's and AdaMeM's update_proj_gap in the paper configs


def bench_config(args: argparse.Namespace, optimizer: str, run_dir: Path, gap: int) -> Config:
    """The trainer's config for one optimizer: `--accumulate` micro-batches per step, no evaluation, no
    checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    width = ModelConfig.from_flavor(args.flavor).d_model
    fused = optimizer == "adalomo" or optimizer in args.fused
    overrides = {
        "run.dir": run_dir,
        "model.flavor": args.flavor,
        "data.prepared_dir": args.data,
        "data.seq_len": args.seq_len,
        "data.val_tokens": 4 * args.seq_len,  # the trainer loads them; the benchmark never evaluates
        "model.max_seq_len": args.seq_len,
        "train.global_batch": args.micro_batch * args.accumulate,
        "train.micro_batch": args.micro_batch,
        "train.max_steps": 10**6,
        "train.device": args.device,
        "train.compile": args.compile,
        "train.fused_update": fused,
        "train.max_grad_norm": 0 if fused else 1.0,
        "optim.name": optimizer,
        "eval.interval": 0,
        "log.tensorboard": False,
        "checkpoint.resume": False,
        "scheduler.warmup_steps": 0,
    }
    if optimizer in LOW_RANK:
        overrides |= {"optim.rank": max(1, width // 4), "optim.update_proj_gap": gap}
    if optimizer == "adalomo":
        overrides |= {"optim.lr": 1e-3}
    if args.compile_optim and "compile" in optimizer_keys(optimizer):
        overrides |= {"optim.compile": True}
    return load_config(None, [f"--{k}={v}" for k, v in overrides.items()])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Trainer, steps: int, first: int, split: bool = True) -> dict[str, float]:
    """Seconds per step over `steps` steps from step `first`, run as the trainer runs them: no device
    synchronisation inside, one at each end (`step`: on a GPU the host queues the next kernels while the device
    runs, so host-side work such as an optimizer's launches can hide behind the device's). With `split`, `steps`
    more, split into their three parts by a synchronisation between them: the median data wait, forward +
    backward and update. The parts add up to the serial time, which can exceed `step` on a GPU."""
    device = trainer.info.device
    batches = trainer.data.batches(first)
    _sync(device)
    start = time.perf_counter()
    for step in range(first, first + steps):
        trainer.train_step(step, *next(batches))
    _sync(device)
    step_time = (time.perf_counter() - start) / steps
    if not split:
        return {"step": step_time}
    parts: dict[str, list[float]] = {"data": [], "fwd_bwd": [], "update": []}
    for step in range(first + steps, first + 2 * steps):
        _sync(device)
        t0 = time.perf_counter()
        inputs, targets = next(batches)
        t1 = time.perf_counter()
        trainer.set_lr(step)
        trainer.compute_gradients(inputs, targets)
        _sync(device)
        t2 = time.perf_counter()
        trainer.apply_update(step)
        _sync(device)
        t3 = time.perf_counter()
        for key, value in (("data", t1 - t0), ("fwd_bwd", t2 - t1), ("update", t3 - t2)):
            parts[key].append(value)
    return {"step": step_time, **{k: statistics.median(v) for k, v in parts.items()}}


def warmed_trainer(cfg: Config, info: DistInfo, warmup: int) -> Trainer:
    """The trainer of `cfg` after `warmup` steps (the optimizer state, the first projector, compilation). Its
    header goes to stderr: stdout holds the table alone."""
    with contextlib.redirect_stdout(sys.stderr):
        trainer = Trainer(cfg, info)
    batches = trainer.data.batches(0)
    for step in range(warmup):
        trainer.train_step(step, *next(batches))
    return trainer


def release_trainers(device: torch.device) -> None:
    """Free the trainers measured before, so that a previous optimizer's weights and state are not allocated
    when the next one's peak memory is measured. A Trainer is freed by its last reference
    (tests/trainer/test_trainer_lifetime.py), except the process's first: torch.optim imports torch._dynamo on
    first use, and that import leaves its frames, the Trainer's included, to the cycle collector."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_one(args: argparse.Namespace, optimizer: str, tmp: Path, info: DistInfo) -> dict[str, Any]:
    device = info.device
    cfg = bench_config(args, optimizer, tmp / optimizer, gap=10**9)
    release_trainers(device)
    trainer = warmed_trainer(cfg, info, args.warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(trainer, args.steps, args.warmup)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    after = args.warmup + 2 * args.steps  # the steps time_steps ran
    with count_host_syncs(device) as syncs:
        trainer.train_step(after, *next(trainer.data.batches(after)))
    flops = trainer.flops.cumulative(1)  # one steady step (no refresh at T = 10**9)
    tokens_per_step = trainer.tokens_per_step
    del trainer
    amortised, refresh = times["step"], None
    if optimizer in LOW_RANK:  # a refresh step (an SVD per matrix), amortised over T steps
        gap = args.proj_gap
        release_trainers(device)
        # One warm-up step (the first SVD's setup) and a few timed: every step here runs an SVD per matrix.
        refresh_cfg = bench_config(args, optimizer, tmp / f"{optimizer}_refresh", gap=1)
        warmup = min(args.warmup, 1)
        refresh_trainer = warmed_trainer(refresh_cfg, info, warmup)
        refresh = time_steps(refresh_trainer, min(3, max(1, args.steps // 2)), warmup, split=False)["step"]
        del refresh_trainer
        amortised = (refresh + (gap - 1) * times["step"]) / gap
    fused_saving = cfg.train.fused_update and args.accumulate == 1  # see the module docstring
    accounted = measure(cfg.model, cfg.optim, fused_saving, args.micro_batch, args.seq_len, "meta")
    peak_flops = device_peak_flops(device)
    return dict(
        optimizer=optimizer + (" (fused)" if cfg.train.fused_update else ""),
        amortised=amortised,
        refresh=refresh,  # a projector-refresh step's time (GaLore / AdaMeM), else None
        tokens_per_s=tokens_per_step / amortised,
        mfu=flops / (amortised * peak_flops) if peak_flops else None,
        **times,
        peak=peak,
        accounted=accounted["peak"],
        formula=accounted["formula"],
        syncs=syncs.total,
        sync_sites=dict(syncs.sites),
    )


def print_header(args: argparse.Namespace, device: str, unit: str) -> None:
    compiled = (", compiled blocks" if args.compile else "") + (", compiled updates" if args.compile_optim else "")
    accumulated = f" x {args.accumulate} per step" if args.accumulate > 1 else ""
    print(
        f"{args.flavor}, seq {args.seq_len}, micro-batch {args.micro_batch}{accumulated}, {device}{compiled}; "
        f"{args.steps} steps after {args.warmup}, then {args.steps} split in parts (medians); "
        f"SVD amortised at T = {args.proj_gap}; memory in GiB"
    )
    print(
        f"| vs {unit} | optimizer | tokens/s | MFU | step ms | fwd+bwd ms | update ms | data ms | peak measured | "
        "peak accounted | formula | host syncs/step |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)


def print_row(r: dict[str, Any], base: float) -> None:
    """One optimizer's row, printed as soon as it is measured (a run cut short keeps the rows it finished)."""
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    peak = f"{r['peak'] / GiB:.2f}" if r["peak"] is not None else "-"
    print(
        f"| {r['amortised'] / base:.3f}x | {r['optimizer']} | {r['tokens_per_s']:,.0f} | {mfu} | "
        f"{1e3 * r['amortised']:.1f} | {1e3 * r['fwd_bwd']:.1f} | {1e3 * r['update']:.1f} | "
        f"{1e3 * r['data']:.2f} | {peak} | {r['accounted'] / GiB:.2f} | {r['formula'] / GiB:.2f} | {r['syncs']} |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="tiny")
    ap.add_argument("--optim", nargs="+", default=list(OPTIMIZERS), help=f"default: {' '.join(OPTIMIZERS)}")
    ap.add_argument("--fused", nargs="*", default=[], help="optimizers to run fused in backward (adalomo always is)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--accumulate", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--proj-gap", type=int, default=PAPER_T, help="T for the amortised SVD of GaLore / AdaMeM")
    ap.add_argument("--compile", action="store_true", help="compile the blocks (train.compile)")
    ap.add_argument(
        "--compile-optim", action="store_true", help="compile the updates of the optimizers that read optim.compile"
    )
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--data", default=str(sample_tokens_dir()), help="prepared tokens (default: the sample corpus)")
    args = ap.parse_args(argv)
    for flag in ("micro_batch", "accumulate", "seq_len", "steps"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    # The unit of the first column: AdamW's step, measured first; without AdamW, the first optimizer's.
    unit = next((o for o in args.optim if o.startswith("adamw")), args.optim[0])
    args.optim = [unit, *(o for o in args.optim if o != unit)]
    with tempfile.TemporaryDirectory() as tmp:
        try:  # every optimizer's settings, before anything is timed (a typo in the last one fails now)
            for optimizer in args.optim:
                bench_config(args, optimizer, Path(tmp) / optimizer, args.proj_gap)
        except ValueError as e:  # ConfigError, or an unknown flavour (ModelConfig.from_flavor)
            ap.error(str(e))
    info = init_distributed(args.device)  # one process: --device resolved as train.device (auto = CUDA if visible)
    cuda = info.device.type == "cuda"
    print_header(args, torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads", unit)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer in args.optim:
            try:
                rows.append(bench_one(args, optimizer, Path(tmp), info))
            except DataError as e:  # found when the first trainer opens the data
                ap.error(str(e))
            print_row(rows[-1], rows[0]["amortised"])
    for r in rows:
        if r["syncs"]:
            print(f"host syncs of {r['optimizer']}: {r['sync_sites']}")
    return rows


if __name__ == "__main__":
    main()
