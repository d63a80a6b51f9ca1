"""GaLore's projected backward (optim/projected_backward.py) against the ordinary backward and AdamW:
backward FLOPs (counted by torch's FlopCounterMode, checked equal to the closed form) and CPU wall time.

    python tools/bench_projected_backward.py [--width 1024] [--mlp 4096] [--batch 4] [--seq 512]
        [--ranks 64 128 256 512] [--repeats 3] [--threads 0] [--proj-type std]

Shapes: the linear weights of one 210m block (width 1024, MLP 4096): qkv 3072x1024, out 1024x1024,
up 4096x1024, down 1024x4096, each fed a micro-batch of batch x seq tokens (z = 2048): a random input
(requiring grad, so the input gradient is computed as in a real block) and a random output gradient.
Attention, norms and the activation are the same in every path and left out.

Paths, per weight: `AdamW` (nn.Linear's ordinary backward, torch.optim.AdamW foreach step); `GaLore`
(the same backward, forming G, then GaLoreAdamW's step projects G: 2 r m n more FLOPs); `projected`
(the same layer with install_projected_backward: R = project(G) computed in backward; the step skips the
projection). GaLore's steps are timed between projector refreshes (the SVD step is ordinary in both
GaLore paths; tools/bench_optim.py times it). Timings: for each rank, `repeats` rounds, each timing one
forward+backward and one full step (forward+backward+optimizer step) of every path in turn (A, B, C,
A, B, C, ...), after one untimed warm-up round; the medians are printed. FLOP counts are of the backward
only (the forward is 2 z m n in every path).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from optim import GaLoreAdamW
from optim.projected_backward import backward_flops, install_projected_backward
from optim.projector import projection_side
from trainer.flag_parser import FlagParser

PATHS = ("AdamW", "GaLore", "projected")


@dataclass
class Layer:
    """One weight under one path: its module, optimizer and a fixed input / output gradient."""

    name: str
    module: nn.Linear
    opt: torch.optim.Optimizer
    x: torch.Tensor
    gy: torch.Tensor

    def forward_backward(self) -> None:
        self.module(self.x).backward(self.gy)

    def step(self) -> None:
        self.forward_backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.x.grad = None


def block_shapes(width: int, mlp: int) -> dict[str, tuple[int, int]]:
    return {"qkv": (3 * width, width), "out": (width, width), "up": (mlp, width), "down": (width, mlp)}


def build(path: str, name: str, shape: tuple[int, int], rank: int, proj_type: str, batch: int, seq: int) -> Layer:
    gen = torch.Generator().manual_seed(0)
    m, n = shape
    module = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.randn(m, n, generator=gen) * 0.02)
    x = torch.randn(batch, seq, n, generator=gen).requires_grad_()
    gy = torch.randn(batch, seq, m, generator=gen)
    opt: torch.optim.Optimizer
    if path == "AdamW":
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    else:
        # The randomized SVD only makes the untimed first step (which computes the bases) cheaper.
        group = dict(params=[module.weight], rank=rank, update_proj_gap=10**9, proj_type=proj_type)
        group["svd_method"] = "randomized"
        opt = GaLoreAdamW([{**group, "projected_backward": path == "projected"}], lr=1e-3, betas=(0.9, 0.95))
        if path == "projected":
            install_projected_backward(module, opt)
    layer = Layer(name, module, opt, x, gy)
    layer.step()  # the first step computes the bases (SVD of G); every later one is a projected step
    return layer


def counted_backward_flops(layer: Layer) -> int:
    y = layer.module(layer.x)
    with FlopCounterMode(display=False) as counter:
        y.backward(layer.gy)
    layer.opt.zero_grad(set_to_none=True)
    layer.x.grad = None
    return int(counter.get_total_flops())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_rank(args: argparse.Namespace, rank: int) -> dict[str, float]:
    """Block totals at `rank`: counted and closed-form backward FLOPs per path, median times (s)."""
    shapes = block_shapes(args.width, args.mlp)
    z = args.batch * args.seq
    layers = {p: [build(p, k, s, rank, args.proj_type, args.batch, args.seq) for k, s in shapes.items()] for p in PATHS}
    out: dict[str, float] = {}
    for path in ("GaLore", "projected"):
        counted = sum(counted_backward_flops(layer) for layer in layers[path])
        closed = 0
        for m, n in shapes.values():
            side = projection_side((m, n), args.proj_type)
            closed += backward_flops(z, m, n, rank if path == "projected" else None, side)
        out[f"flops_{path}"], out[f"closed_{path}"] = counted, closed
    fb: dict[str, list[float]] = {p: [] for p in PATHS}
    st: dict[str, list[float]] = {p: [] for p in PATHS}
    for i in range(args.repeats + 1):  # round 0 warms up
        for path in PATHS:
            t_fb = sum(timed(layer.forward_backward) for layer in layers[path])
            for layer in layers[path]:
                layer.opt.zero_grad(set_to_none=True)
                layer.x.grad = None
            t_st = sum(timed(layer.step) for layer in layers[path])
            if i:
                fb[path].append(t_fb)
                st[path].append(t_st)
    for path in PATHS:
        out[f"fb_{path}"] = statistics.median(fb[path])
        out[f"step_{path}"] = statistics.median(st[path])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--mlp", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--proj-type", default="std", choices=["std", "reverse_std", "left", "right", "full"])
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    z = args.batch * args.seq
    print(
        f"one block's linear weights (width {args.width}, MLP {args.mlp}), z = {args.batch} x {args.seq} = {z} tokens, "
        f"proj_type {args.proj_type}, CPU, {torch.get_num_threads()} threads, median of {args.repeats}\n"
    )
    print(
        "| rank | bwd GFLOP ordinary (counted = closed form) | bwd GFLOP projected (counted = closed form) "
        "| fwd+bwd ms ordinary | fwd+bwd ms projected | step ms AdamW | step ms GaLore | step ms projected "
        "| projected / AdamW step |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    mismatch = False
    for rank in args.ranks:
        r = bench_rank(args, rank)
        ok = {p: r[f"flops_{p}"] == r[f"closed_{p}"] for p in ("GaLore", "projected")}
        mismatch |= not all(ok.values())

        def flops(path: str, r: dict[str, float] = r, ok: dict[str, bool] = ok) -> str:
            mark = "=" if ok[path] else "!="
            return f"{r[f'flops_{path}'] / 1e9:.2f} {mark} {r[f'closed_{path}'] / 1e9:.2f}"

        print(
            f"| {rank} | {flops('GaLore')} | {flops('projected')} | {r['fb_GaLore'] * 1e3:.0f} "
            f"| {r['fb_projected'] * 1e3:.0f} | {r['step_AdamW'] * 1e3:.0f} | {r['step_GaLore'] * 1e3:.0f} "
            f"| {r['step_projected'] * 1e3:.0f} | {r['step_projected'] / r['step_AdamW']:.2f} |",
            flush=True,
        )
    print(
        "\nordinary = nn.Linear's backward (AdamW and GaLore alike: the input gradient and G); "
        "projected = the input gradient and R = project(G) directly. The fwd+bwd times of ordinary are those "
        "of the GaLore path (AdamW's backward is the same computation)."
    )
    if mismatch:
        print("error: counted FLOPs differ from the closed form", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
