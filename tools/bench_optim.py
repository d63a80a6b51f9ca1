"""Optimizer step() time on a model's shapes, relative to fused torch.optim.AdamW on the same machine.

    python tools/bench_optim.py [--flavor 210m] [--rank 128] [--threads 1] [--repeats 3] [--targets blocks]
    python tools/bench_optim.py --optims adalomo --adalomo-arms nmf-2 svd-1 qr-4   # AdaLomo's factorization arms

Method: step() is a loop over parameters whose per-parameter cost depends only on the shape and
the group options, so each distinct (shape, group) is timed with a single-parameter optimizer built
from the registry's spec (fp32, random gradients), and the model's step time is the sum over
parameters (count x time). This keeps 550m-sized benchmarks to a few minutes of CPU.
Adafactor, AdaLomo and AdaMeM are timed three times: their fast path (optim/factored_kernels.py, what the trainer
runs by default), the same path compiled (`[compiled]`, optim.compile: optim/compiled_steps.py; the first step,
which compiles, is not timed) and their readable reference code (`[reference code]`). Per optimizer it prints: the
step time without an SVD (median of `repeats` steps after the first) and the step time of a projector-refresh step
(SVD; `update_proj_gap=1`), both relative to fused AdamW (timed in turns with the first, on the same
shapes), and the SVD's amortised share of the average step at T = 200, for the exact SVD and
the randomized one (`svd_method: randomized`), with the subspace difference between the two
(mean over matrices of || P_exact P_exact^T - P_rand P_rand^T ||_F / sqrt(2 r)). Low-rank methods also
get their floor (the issue's: their projection matmuls timed alone plus an elementwise step like
Adafactor's; `lowrank_floor`) and their step time over it. `--adalomo-arms` adds a row per AdaLomo
factorization arm (`optim.factorization`-`optim.factor_rank`, optim/factorization.py; every arm but nmf-1 runs
the reference code), and `--optims` keeps only the rows named (fused AdamW is timed alongside every row anyway).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from data.paths import sample_tokens_dir
from model import DEFAULT_CHUNK_TOKENS, ModelConfig, Transformer
from optim import Adafactor, OptimConfig, optimizer_spec
from optim.factorization import FACTORIZATIONS
from optim.param_groups import group_options
from optim.projector import compute_bases
from optim.registry import OptimizerSpec
from trainer.flag_parser import FlagParser

T_PAPER = 200
FAST_PATH = ("adafactor", "adalomo", "adamem")  # optimizers with a fast path, its compiled form and a reference code
Kind = tuple[tuple[int, ...], str]  # (shape, the group options' repr)


def _kinds(spec: OptimizerSpec) -> tuple[Counter[Kind], dict[Kind, dict[str, Any]]]:
    """How many parameters of each (shape, group options), and those options."""
    kinds: Counter[Kind] = Counter()
    examples: dict[Kind, dict[str, Any]] = {}
    for group in spec.param_groups:
        options = group_options(group)
        for p in group["params"]:
            key = (tuple(p.shape), repr(sorted(options.items())))
            kinds[key] += 1
            examples[key] = options
    return kinds, examples


def time_single_parameter(
    cls: type[torch.optim.Optimizer],
    options: dict[str, Any],
    kwargs: dict[str, Any],
    shape: tuple[int, ...],
    repeats: int,
    gen: torch.Generator,
) -> tuple[float, float, dict[str, Any], float]:
    """(first step time, median later step time, final state, median step time of fused AdamW on the same shape)
    of a one-parameter optimizer on `shape`. The two optimizers step in turns, so that the machine's speed
    drifting over a run (this shared CPU's fused AdamW moved 30% between runs) hits both alike: the ratio
    of the two is what the table reports."""
    p = nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
    grads = [torch.randn(shape, generator=gen) for _ in range(repeats + 1)]
    opt = cls([{**options, "params": [p]}], **kwargs)
    q = nn.Parameter(p.detach().clone())
    adamw = torch.optim.AdamW([q], fused=True)
    times: list[float] = []
    adamw_times: list[float] = []

    def timed(o: torch.optim.Optimizer, into: list[float]) -> None:
        t0 = time.perf_counter()
        o.step()
        into.append(time.perf_counter() - t0)

    for i, g in enumerate(grads):
        p.grad, q.grad = g, g
        turns = [(opt, times), (adamw, adamw_times)]  # who goes first alternates: neither inherits a warm cache
        for o, into in turns if i % 2 == 0 else turns[::-1]:
            timed(o, into)
    return times[0], statistics.median(times[1:]), opt.state[p], statistics.median(adamw_times[1:])


def _spec(model: nn.Module, cfg: OptimConfig, fast: bool) -> OptimizerSpec:
    """The registry's spec of `cfg`, with AdamW fused and, `fast=False`, the reference code of the
    FAST_PATH optimizers instead of their fast path (optim/factored_kernels.py)."""
    spec = optimizer_spec(model, cfg)
    if cfg.name == "adamw":
        spec.kwargs.update(fused=True, foreach=None)
    if not fast:
        spec.kwargs.update(fast=False)
    return spec


def bench(model: nn.Module, cfg: OptimConfig, repeats: int, gen: torch.Generator, fast: bool = True) -> dict[str, Any]:
    """Model step time (s): plain step, and refresh (SVD) step when low-rank (`fast`: see _spec)."""
    spec = _spec(model, cfg, fast)
    kinds, examples = _kinds(spec)
    plain = svd = floor = adamw = 0.0
    bases: list[tuple[tuple[int, ...], dict[str, torch.Tensor]]] = []
    for key, count in kinds.items():
        shape, _ = key
        options = examples[key]
        lowrank = options.get("rank") is not None and len(shape) == 2
        first, later, _, alongside = time_single_parameter(spec.cls, options, spec.kwargs, shape, repeats, gen)
        plain += count * later
        adamw += count * alongside
        floor += count * (lowrank_floor(cfg.name, shape, options["rank"], repeats, gen) if lowrank else later)
        if lowrank:
            # a refresh on every step: median of `repeats` SVD steps (not the first: allocation)
            _, refresh, state, _ = time_single_parameter(
                spec.cls, {**options, "update_proj_gap": 1}, spec.kwargs, shape, max(1, repeats // 2), gen
            )
            svd += count * refresh
            bases.append((shape, {k: state[k] for k in ("proj_left", "proj_right") if k in state}))
        else:
            svd += count * later
    return {"plain": plain, "svd": svd, "bases": bases, "floor": floor, "adamw": adamw}


def _median_time(fn: Any, repeats: int) -> float:
    fn()  # allocation, first touch
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lowrank_floor(name: str, shape: tuple[int, ...], rank: int, repeats: int, gen: torch.Generator) -> float:
    """The issue's floor of one low-rank matrix's step: its projection matmuls timed alone (GaLore: P^T G and
    P N; AdaMeM: also P R for the residual) plus an elementwise step like Adafactor's: fused AdamW
    (GaLore-AdamW) or Adafactor's fast path (the others) on the r x n projected gradient, and one pass over the
    m x n weights (GaLore) or Adafactor's fast path on the m x n residual (AdaMeM)."""
    m, n = sorted(shape)  # both methods project the smaller side
    g = torch.randn(m, n, generator=gen)
    basis = torch.linalg.qr(torch.randn(m, rank, generator=gen)).Q
    low = torch.randn(rank, n, generator=gen)
    w = torch.randn(m, n, generator=gen)
    matmuls = _median_time(lambda: basis.T @ g, repeats) + _median_time(lambda: basis @ low, repeats)
    if name == "adamem":
        matmuls += _median_time(lambda: basis @ low, repeats)

    def one_step(make: Any, rows: int) -> float:
        p = nn.Parameter(torch.randn(rows, n, generator=gen))
        p.grad = torch.randn(rows, n, generator=gen)
        opt = make([p])
        return _median_time(opt.step, repeats)

    if name == "galore_adamw":
        small = one_step(lambda ps: torch.optim.AdamW(ps, fused=True), rank)
        full = _median_time(lambda: w.add_(g, alpha=-1e-3), repeats)
    else:
        small = one_step(lambda ps: Adafactor(ps, lr=1e-3, beta1=0.9), rank)
        full = (
            one_step(lambda ps: Adafactor(ps, lr=1e-3), m)
            if name == "adamem"
            else _median_time(lambda: w.add_(g, alpha=-1e-3), repeats)
        )
    return matmuls + small + full


# aten ops that launch no kernel on a GPU (views, metadata, allocation): not counted as launches.
_NO_KERNEL = {
    "aten::view", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::expand_as", "aten::t", "aten::transpose",
    "aten::reshape", "aten::as_strided", "aten::select", "aten::slice", "aten::detach", "aten::alias",
    "aten::lift_fresh", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_", "aten::item",
    "aten::_local_scalar_dense", "aten::result_type", "aten::is_nonzero", "aten::size", "aten::stride",
}  # fmt: skip


def _inside(event: Any, prefix: str) -> bool:
    """Whether a profiler event runs inside one whose name starts with `prefix`."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False


def op_counts(flavor: str, configs: list[tuple[str, OptimConfig, bool]]) -> dict[str, tuple[int, int]]:
    """{label: (ops, of them kernel-launching)} of one whole-model step() (the third: state exists and
    GaLore's projector is fixed) for each (label, config, fast: see _spec). Ops: the aten ops called from Python
    (not those nested inside other aten ops): on a GPU each kernel-launching one is at least one kernel launch;
    inside a compiled function (optim.compile), the kernels Inductor generated instead (one launch each), and not
    the host-side wrapping of its float arguments. CPU, real tensors."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_flavor(flavor))
    out = {}
    # Inductor's CPU kernels appear in the profile only when compiled with this on: compile afresh.
    torch.compiler.reset()
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        for label, cfg, fast in configs:
            opt = _spec(model, cfg, fast).build()
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            with torch.no_grad():
                opt.step()
                opt.step()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    opt.step()
            events = prof.events()
            top = [
                e.name
                for e in events
                if e.name.startswith("aten::")
                and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
                and not _inside(e, "Torch-Compiled Region")
            ]
            generated = sum(1 for e in events if e.cpu_parent is not None and e.cpu_parent.name.startswith("## Call"))
            launching = sum(1 for n in top if n not in _NO_KERNEL) + generated
            out[label] = (len(top) + generated, launching)
    return out


def real_gradient_gap(flavor: str, rank: int, tokens: str, batch: int = 4, seq_len: int = 512) -> dict[str, float]:
    """Subspace distance randomized vs exact SVD on real gradients: one forward/backward of the `flavor` model
    (at its initialisation) on `batch` windows of prepared text (`tokens`: the sample corpus by default),
    for one matrix of each distinct shape of the blocks. {shape: distance}."""
    from data import DataConfig, TrainBatches

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_flavor(flavor, max_seq_len=seq_len))
    data = TrainBatches(DataConfig(prepared_dir=tokens, seq_len=seq_len, val_tokens=0), global_batch=batch)
    inputs, targets = next(data.batches(0))
    model(inputs, targets=targets, loss_chunk_tokens=DEFAULT_CHUNK_TOKENS).backward()
    out: dict[str, float] = {}
    for name, p in model.named_parameters():
        key = "x".join(map(str, p.shape))
        if not name.startswith("blocks.") or p.dim() != 2 or key in out:
            continue
        assert p.grad is not None
        a = compute_bases(p.grad, rank, "left", "exact", 0, {})["proj_left"]
        b = compute_bases(p.grad, rank, "left", "randomized", 0, {})["proj_left"]
        out[key] = float((a @ a.T - b @ b.T).norm() / (2 * a.shape[1]) ** 0.5)
    return out


def _subspace_gap(shapes: list[tuple[int, ...]], rank: int, gen: torch.Generator) -> tuple[float, float]:
    """Mean subspace distance randomized vs exact, on random gradients with a flat spectrum (worst
    case) and with a power-law spectrum s_i = 1/i (closer to real gradients)."""
    out = []
    for decay in (False, True):
        gaps = []
        for m, n in shapes:
            k = min(m, n)
            if decay:
                s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
                g = torch.randn(m, k, generator=gen) @ (torch.randn(k, n, generator=gen) * s[:, None])
            else:
                g = torch.randn(m, n, generator=gen)
            a = compute_bases(g, rank, "left", "exact", 0, {})["proj_left"]
            b = compute_bases(g, rank, "left", "randomized", 0, {})["proj_left"]
            gaps.append(float((a @ a.T - b @ b.T).norm() / (2 * a.shape[1]) ** 0.5))
        out.append(sum(gaps) / len(gaps))
    return out[0], out[1]


def has_fast_path(cfg: OptimConfig) -> bool:
    """Whether `cfg` runs a fast path (optim/factored_kernels.py), with a compiled form and a reference code."""
    return cfg.name in FAST_PATH and (cfg.name != "adalomo" or (cfg.factorization, cfg.factor_rank) == ("nmf", 1))


def bench_rows(base: OptimConfig) -> list[tuple[str, OptimConfig]]:
    """The table's rows: (label, config); a label's first word is its name for `--optims`."""
    return [
        ("adamw (fused)", replace(base, name="adamw")),
        ("adafactor", replace(base, name="adafactor", beta1=None)),
        ("adafactor+momentum", replace(base, name="adafactor", beta1=0.9)),
        ("adalomo", replace(base, name="adalomo")),
        ("galore_adamw", replace(base, name="galore_adamw")),
        ("galore_adafactor", replace(base, name="galore_adafactor")),
        ("adamem", replace(base, name="adamem")),
    ]


ROW_NAMES = tuple(label.split(" ")[0] for label, _ in bench_rows(OptimConfig()))


def adalomo_arm(text: str) -> tuple[str, int]:
    """'svd-2' -> ('svd', 2): an AdaLomo factorization arm (optim.factorization, optim.factor_rank)."""
    method, _, rank = text.rpartition("-")
    if method not in FACTORIZATIONS or not rank.isdigit() or int(rank) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not METHOD-RANK with METHOD one of {', '.join(FACTORIZATIONS)} and RANK >= 1, e.g. svd-2"
        )
    return method, int(rank)


def _variants(rows: list[tuple[str, OptimConfig]]) -> list[tuple[str, OptimConfig, bool]]:
    """(label, config, fast: see _spec) of every row's fast path, then, for the FAST_PATH rows, of that path
    compiled (optim.compile) and of their reference code."""
    fast_rows = [(label, cfg) for label, cfg in rows if has_fast_path(cfg)]
    return (
        [(label, cfg, True) for label, cfg in rows]
        + [(f"{label} [compiled]", replace(cfg, compile=True), True) for label, cfg in fast_rows]
        + [(f"{label} [reference code]", cfg, False) for label, cfg in fast_rows]
    )


def host_overhead(configs: list[tuple[str, OptimConfig, bool]], n: int = 20, steps: int = 100) -> dict[str, float]:
    """{label: seconds per matrix of step()} on n 16 x 16 matrices, where the arithmetic is negligible: the host's
    cost of issuing one matrix's update (eager ops, or the compiled functions' guards and argument wrapping). On a
    GPU the step runs at the larger of this (times the number of matrices) and the kernels' time."""
    out = {}
    for label, cfg, fast in configs:
        model = nn.ParameterList(nn.Parameter(torch.randn(16, 16)) for _ in range(n))
        spec = _spec(model, replace(cfg, weight_decay=0.1), fast)
        opt = spec.build()
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        with torch.no_grad():
            for _ in range(5):
                opt.step()
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step()
        out[label] = (time.perf_counter() - t0) / steps / n
    return out


def main(argv: list[str] | None = None) -> int:
    ap = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="210m")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--targets", default="blocks", choices=["blocks", "all"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--real-gradients",
        default=str(sample_tokens_dir()),
        help="prepared tokens for the randomized-vs-exact SVD check on real gradients ('' = skip)",
    )
    ap.add_argument(
        "--ops-flavor", default="tiny", help="count the aten ops of a whole-model step on this model ('' = skip)"
    )
    ap.add_argument("--optims", nargs="+", choices=ROW_NAMES, default=list(ROW_NAMES), help="the rows to time")
    ap.add_argument(
        "--adalomo-arms",
        nargs="+",
        type=adalomo_arm,
        default=[],
        metavar="METHOD-RANK",
        help=f"also time AdaLomo with these factorizations, e.g. nmf-2 svd-1 (methods: {', '.join(FACTORIZATIONS)})",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_flavor(args.flavor))
    base = OptimConfig(rank=args.rank, lowrank_targets=args.targets)
    rows = [(label, cfg) for label, cfg in bench_rows(base) if label.split(" ")[0] in args.optims]
    arms = {f"{method}-{rank}": f"adalomo [{method}-{rank}]" for method, rank in args.adalomo_arms}  # arm: label
    rows += [
        (arms[f"{method}-{rank}"], replace(base, name="adalomo", factorization=method, factor_rank=rank))
        for method, rank in args.adalomo_arms
    ]
    gen = torch.Generator().manual_seed(0)
    print(
        f"{args.flavor} shapes, rank {args.rank}, lowrank_targets {args.targets}, {args.threads} thread(s), "
        f"CPU fp32, torch {torch.__version__}"
    )
    results = {}
    for label, cfg in rows:
        results[label] = bench(model, cfg, args.repeats, gen)
        if has_fast_path(cfg):  # the fast path compiled, and the readable reference code the fast path replaces
            results[label + " [compiled]"] = bench(model, replace(cfg, compile=True), args.repeats, gen)
            results[label + " [reference code]"] = bench(model, cfg, args.repeats, gen, fast=False)
        if cfg.rank and cfg.name in ("galore_adamw", "galore_adafactor", "adamem"):
            results[label + " [randomized SVD]"] = bench(
                model, replace(cfg, svd_method="randomized"), args.repeats, gen
            )
    if args.ops_flavor:
        model_params = sum(1 for _ in Transformer(ModelConfig.from_flavor(args.ops_flavor)).parameters())
        counts = op_counts(args.ops_flavor, _variants(rows))
        print(f"aten ops per whole-model step() on the {args.ops_flavor} model ({model_params} parameters):")
        print(f"{'optimizer':<36} {'ops':>6} {'kernel-launching':>17} {'per parameter':>14}")
        for label, (ops, kernels) in counts.items():
            print(f"{label:<36} {ops:6d} {kernels:17d} {kernels / model_params:14.1f}")
    adamw_ms = statistics.median(r["adamw"] for r in results.values()) * 1e3  # timed alongside every row
    print(f"fused AdamW step: {adamw_ms:.0f} ms")
    print(
        f"{'optimizer':<36} {'step ms':>8} {'x AdamW':>8} {'SVD-step ms':>12} {'x AdamW':>8} "
        f"{'avg@T=200 x':>12} {'SVD share':>10} {'floor x AdamW':>14} {'step / floor':>13}"
    )
    for label, r in results.items():
        ref = r["adamw"]  # fused AdamW timed in turns with this row's steps (see time_single_parameter)
        svd_extra = r["svd"] - r["plain"]
        avg = r["plain"] + svd_extra / T_PAPER
        share = (svd_extra / T_PAPER) / avg if r["bases"] else 0.0
        floor = f"{r['floor'] / ref:14.2f} {r['plain'] / r['floor']:13.2f}" if r["bases"] else f"{'-':>14} {'-':>13}"
        print(
            f"{label:<36} {r['plain'] * 1e3:8.0f} {r['plain'] / ref:8.2f} {r['svd'] * 1e3:12.0f} "
            f"{r['svd'] / ref:8.2f} {avg / ref:12.2f} {share:10.1%} {floor}"
        )
    # nmf-1's reference code, which the arms run too: the ratio is the factorization's cost. A ratio of ratios to
    # AdamW, which ran alongside each row, so that the machine's drift between rows cancels.
    if arms and (nmf1_row := results.get("adalomo [reference code]")):
        nmf1 = nmf1_row["plain"] / nmf1_row["adamw"]
        ratios = {arm: results[label]["plain"] / results[label]["adamw"] / nmf1 for arm, label in arms.items()}
        print(
            "AdaLomo factorization arms, step time / nmf-1 (its reference code, as the arms run): "
            + ", ".join(f"{arm} {ratio:.2f}" for arm, ratio in ratios.items())
        )
    shapes = sorted({tuple(sorted(sh)) for r in results.values() for sh, _ in r["bases"]})
    if shapes:
        flat, decayed = _subspace_gap(shapes, args.rank, gen)
        print(
            f"randomized vs exact SVD subspace distance (||PP^T - QQ^T||_F / sqrt(2r); 0 same, 1 orthogonal), "
            f"mean over {shapes}: flat-spectrum random gradients {flat:.3f}, power-law (1/i) spectrum {decayed:.3f}"
        )
    overhead_rows = [row for row in rows if row[0] in ("adafactor", "adafactor+momentum", "adalomo")]
    if overhead_rows:
        overhead = host_overhead(_variants(overhead_rows))
        print("host time per matrix update (16 x 16 matrices: issuing the work, not doing it), us:")
        print("  " + ", ".join(f"{label} {1e6 * t:.0f}" for label, t in overhead.items()))
    if args.real_gradients and shapes:  # low-rank rows were timed
        gaps = real_gradient_gap(args.flavor, args.rank, args.real_gradients)
        print(
            f"randomized vs exact SVD subspace distance on real gradients ({args.flavor} at init, 4 x 512 tokens of "
            f"{args.real_gradients}): " + ", ".join(f"{k} {v:.3f}" for k, v in gaps.items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
