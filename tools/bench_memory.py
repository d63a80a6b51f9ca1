"""Peak memory of one training step, per optimizer, fused in backward or not; and step times.

    python tools/bench_memory.py                          # 210m and 550m, micro-batch 8 x 512
    python tools/bench_memory.py --flavors 210m --micro-batch 4 --optims adamw adalomo
    python tools/bench_memory.py --time                   # CPU step times (tiny model)
    python tools/bench_memory.py --flavors 210m --adapter-rank 128   # LoRA r=128 (full-rank optimizers)

How the memory is accounted (meta device by default: shapes only, the numbers of a real run):
trainer/memory_accounting.py.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from model import DEFAULT_CHUNK_TOKENS, ModelConfig, Transformer
from optim import REGISTRY, OptimConfig, optimizer_keys, optimizer_spec
from optim.in_backward import InBackwardOptimizer
from trainer.config import AdapterConfig
from trainer.flag_parser import FlagParser
from trainer.memory_accounting import measure
from trainer.step import token_loss_sum

GiB = 2**30


def _optim_cfg(name: str, **kw: Any) -> OptimConfig:
    base: dict[str, Any] = dict(name=name)
    if name == "adalomo":
        base.update(lr=1e-3, clip_threshold=1.0, beta2_decay=-0.8)
    base.update(kw)
    return OptimConfig(**base)


def memory_table(
    flavors: list[str],
    optims: list[tuple[str, OptimConfig]],
    micro_batch: int,
    seq_len: int,
    device: str,
    adapter: AdapterConfig | None = None,
) -> None:
    lora = "" if adapter is None else f", LoRA rank {adapter.rank} (dropout {adapter.dropout:g}) on the blocks' linears"
    print(
        f"peak memory of one training step, micro-batch {micro_batch} x {seq_len} tokens, fp32, device={device}{lora}"
    )
    print("GiB; peak = measured (weights + state + max over backward of live activations + gradients [+ deferred U]);")
    print("formula = weights + gradients (all; fused: largest one) + state + activations")
    hdr = (
        f"{'model':>6} {'optimizer':<24} {'fused':>5} {'weights':>8} {'grads':>7} {'state':>7} {'activ':>7} "
        f"{'defer':>6} {'peak':>7} {'formula':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for flavor in flavors:
        mcfg = ModelConfig.from_flavor(flavor, max_seq_len=max(seq_len, 512))
        for label, ocfg in optims:
            for fused in (False, True):
                try:
                    r = measure(mcfg, ocfg, fused, micro_batch, seq_len, device, adapter=adapter)
                except Exception as e:  # an optimizer that cannot run shape-only: say so, keep going
                    print(f"{flavor:>6} {label:<24} {str(fused):>5}  failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                print(
                    f"{flavor:>6} {label:<24} {str(fused):>5} {r['weights'] / GiB:8.3f} {r['grads_peak'] / GiB:7.3f} "
                    f"{r['state'] / GiB:7.3f} {r['activations'] / GiB:7.3f} {r['deferred'] / GiB:6.3f} "
                    f"{r['peak'] / GiB:7.3f} {r['formula'] / GiB:8.3f}"
                )
                sys.stdout.flush()


def time_steps(
    model_cfg: ModelConfig, optim_cfg: OptimConfig | None, fused: bool, micro_batch: int, seq_len: int, steps: int
) -> float:
    """Median seconds per step (forward + backward + update) on CPU; optim_cfg None = no update."""
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    opt: InBackwardOptimizer | torch.optim.Optimizer | None = None
    if optim_cfg is not None:
        spec = optimizer_spec(model, optim_cfg)
        opt = InBackwardOptimizer(spec) if fused else spec.build()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len + 1), generator=g)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        if isinstance(opt, InBackwardOptimizer):
            opt.arm(True)
        token_loss_sum(model, tokens[:, :-1], tokens[:, 1:], contextlib.nullcontext(), DEFAULT_CHUNK_TOKENS).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        if step > 0:  # step 0 allocates state (and runs the first-step factorisation init)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_table(flavor: str, optims: list[tuple[str, OptimConfig]], micro_batch: int, seq_len: int, steps: int) -> None:
    mcfg = ModelConfig.from_flavor(flavor, max_seq_len=max(seq_len, 512))
    base = time_steps(mcfg, None, False, micro_batch, seq_len, steps)
    print(
        f"CPU step time, model {flavor}, micro-batch {micro_batch} x {seq_len}, median of {steps} steps, "
        f"{torch.get_num_threads()} thread(s); forward+backward alone: {base * 1e3:.1f} ms"
    )
    print(
        f"{'optimizer':<28} {'plain ms':>9} {'fused ms':>9} {'fused/plain':>11} "
        f"{'opt ms plain':>12} {'opt ms fused':>12}"
    )
    for label, ocfg in optims:
        plain = time_steps(mcfg, ocfg, False, micro_batch, seq_len, steps)
        fused = time_steps(mcfg, ocfg, True, micro_batch, seq_len, steps)
        print(
            f"{label:<28} {plain * 1e3:9.1f} {fused * 1e3:9.1f} {fused / plain:11.3f} "
            f"{(plain - base) * 1e3:12.1f} {(fused - base) * 1e3:12.1f}"
        )
        sys.stdout.flush()


ADALOMO_GRID: list[tuple[str, dict[str, Any]]] = [
    ("adalomo", {}),
    ("adalomo norm=none", dict(update_norm="none")),
    ("adalomo norm=layerwise", dict(update_norm="layerwise")),
    ("adalomo norm=global", dict(update_norm="global")),
    ("adalomo nmf-2", dict(factor_rank=2)),
    ("adalomo nmf-4", dict(factor_rank=4)),
    ("adalomo svd-1", dict(factorization="svd", factor_rank=1)),
    ("adalomo svd-4", dict(factorization="svd", factor_rank=4)),
    ("adalomo qr-1", dict(factorization="qr", factor_rank=1)),
    ("adalomo qr-4", dict(factorization="qr", factor_rank=4)),
]


def main(argv: list[str] | None = None) -> None:
    ap = FlagParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--flavors", nargs="+", default=["210m", "550m"])
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--optims", nargs="+", default=None, help="registry names (default: all registered)")
    ap.add_argument("--adalomo-grid", action="store_true", help="also every AdaLomo ablation variant")
    ap.add_argument("--device", default="meta", help="meta (shape-only accounting) or cpu")
    ap.add_argument("--time", action="store_true", help="CPU step times instead of memory")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--adapter-rank", type=int, default=0, help="LoRA adapters of this rank (0 = none; memory only)")
    args = ap.parse_args(argv)
    adapter = AdapterConfig(method="lora", rank=args.adapter_rank) if args.adapter_rank else None
    # With adapters only the full-rank optimizers apply (trainer/config.py refuses the low-rank ones).
    names = args.optims or [n for n in sorted(REGISTRY) if adapter is None or "rank" not in optimizer_keys(n)]
    optims = [(n, _optim_cfg(n)) for n in names]
    if args.adalomo_grid:
        optims += [(label, _optim_cfg("adalomo", **kw)) for label, kw in ADALOMO_GRID[1:]]
    if args.time:
        flavor = args.flavors[0] if args.flavors != ["210m", "550m"] else "tiny"
        time_table(flavor, optims, args.micro_batch, args.seq_len, args.steps)
    else:
        memory_table(args.flavors, optims, args.micro_batch, args.seq_len, args.device, adapter)


if __name__ == "__main__":
    main()
