"""Per-rank peak memory of one training step, per optimizer x engine x rank count: which model fits
which setup.

    python tools/bench_engines.py                                  # 550m, llama_1b, llama_7b at 1 and 8 ranks
    python tools/bench_engines.py --flavors 550m --ranks 1 2 8 --micro-batch 32
    python tools/bench_engines.py --flavors tiny --micro-batch 2 --seq-len 64   # seconds (the test's size)

Accounted, not sampled: trainer/memory_accounting.py measures one unsharded step tensor by tensor
on the meta device (weights, optimizer state, live activations and gradients through backward; fp32
throughout, as the trainer's master weights and state; under bf16 autocast activations are about
half). The per-rank figures follow from it with each engine's layout (W ranks, chunk(x) = x's largest
torch.chunk share, ceil(x / W)):

    ddp     W = 1 (no wrapper): the measured peak
            W > 1: the measured peak + DDP's gradient buckets (a second copy of every gradient)
    fsdp2   W > 1: chunk(weights) + state per rank (the state tensors that follow their parameter's
            rows, optim.sharding.state_shard_dim, split; the others whole) + activations
            + unsharded root parameters (embedding, output layer, final norm: the root does not
            reshard between forward and backward) + 2 unsharded blocks (the current one and the
            prefetched one) + gradients: the root's unsharded output-layer and final-norm gradients,
            which live through the whole backward (the root's reduce-scatter waits for backward's end:
            its forward input, the tokens, has no gradient to hook) + one unsharded block's before its
            reduce-scatter + on the ordinary path chunk(all gradients) (the fused path frees each
            sharded gradient by its update right after the reduce-scatter)
    deepspeed (W > 1; ZeRO keeps a flat fp32 copy of its weight partition for its optimizer even when the
            model is fp32, counted with the state; its gradient bucket, reduce_bucket_size = 5e8 elements
            by default, is counted as min(bucket, all gradients)):
            AdamW ZeRO-1 (ds-z1): weights + all gradients + bucket + chunk(fp32 copy + state)
                  ZeRO-2 (ds-z2): weights + chunk(gradients) + bucket + chunk(fp32 copy + state)
                  ZeRO-3 (ds-z3): chunk(weights) + 2 gathered blocks + chunk(gradients) + bucket
                                  + chunk(fp32 copy + state)
                  +offload: the fp32 copy and the state live in CPU memory (0 on the GPU)
            AdaLomo ZeRO-3 the LOMO way (fused): chunk(weights) + 2 gathered blocks + the largest full
                  gradient (each is all-reduced, used and freed in its hook) + the whole (small) state

The formula column is the plain sum weights + gradients + state + activations on one rank (the
unsharded step), for comparison. No GPU here: nothing is measured with torch.cuda; on a GPU the
same command prints the same accounting (fragmentation, the CUDA context, NCCL buffers and
transient temporaries inside one op are not counted: keep ~10% headroom).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from model import ModelConfig, Transformer
from optim import OptimConfig
from optim.sharding import chunk_sizes
from trainer.engines import support
from trainer.flag_parser import FlagParser
from trainer.memory_accounting import measure

GiB = 2**30
H100_GIB = 80.0
# Low-rank methods at a quarter of the width (GaLore's 1B / 7B runs: 512 of 2048, 1024 of 4096).
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": dict(name="adamw"),
    "adafactor": dict(name="adafactor", beta1=None),
    "adafactor+momentum": dict(name="adafactor", beta1=0.9),
    "galore_adamw": dict(name="galore_adamw", scale=0.25),
    "adamem": dict(name="adamem"),
    "adalomo": dict(name="adalomo", clip_threshold=1.0, beta2_decay=-0.8),
}
DEFAULT_MICRO_BATCH = {"550m": 32, "llama_1b": 8, "llama_7b": 4}


def chunk(nbytes: int, world: int) -> int:
    return chunk_sizes(nbytes, world)[0]


def layout_bytes(model_cfg: ModelConfig) -> dict[str, int]:
    """Bytes of the root's own parameters (embedding, output layer, final norm), of those whose gradients the
    backward makes first (`head`: output layer and final norm), of the largest block and of the largest
    parameter."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    blocks = {id(p) for p in model.blocks.parameters()}
    root = sum(p.nbytes for p in model.parameters() if id(p) not in blocks)
    head = sum(p.nbytes for p in (*model.lm_head.parameters(), *model.norm.parameters()))
    block = max(sum(p.nbytes for p in b.parameters()) for b in model.blocks)
    largest = max(p.nbytes for p in model.parameters())
    return dict(root=root, head=head, block=block, largest=largest)


def per_rank(engine: str, world: int, fused: bool, m: dict[str, int], layout: dict[str, int]) -> dict[str, int]:
    """{weights, grads, state, activations, transient, total} bytes on one rank (module docstring)."""
    if world == 1 or engine == "ddp":
        buckets = m["weights"] if world > 1 else 0
        return dict(
            weights=m["weights"],
            grads=m["grads_peak"] + buckets,
            state=m["state"],
            activations=m["activations"],
            transient=m["deferred"],
            total=m["peak"] + buckets,
        )
    weights = chunk(m["weights"], world)
    state = m["state_sharded"]
    # lm_head's and the final norm's unsharded gradients are alive when every block's backward starts, and gone
    # only after it (2 gloo ranks: tests/trainer/test_engines.py).
    grads = layout["head"] + layout["block"] + (0 if fused else chunk(m["weights"], world))
    transient = layout["root"] + 2 * layout["block"] + m["deferred"]
    total = weights + state + m["activations"] + grads + transient
    return dict(
        weights=weights, grads=grads, state=state, activations=m["activations"], transient=transient, total=total
    )


DS_BUCKET_BYTES = 500_000_000 * 4  # DeepSpeed's default reduce_bucket_size, in fp32 elements


def per_rank_deepspeed(engine: str, world: int, m: dict[str, int], layout: dict[str, int]) -> dict[str, int]:
    """per_rank's figures under DeepSpeed (`engine`: ds-z1, ds-z2, ds-z3, ds-z3+offload, or ds-z3-lomo for
    AdaLomo's fused updates): the module docstring's formulas."""
    w, gathered = m["weights"], 2 * layout["block"]
    if engine == "ds-z3-lomo":
        weights, grads, state, transient = chunk(w, world), layout["largest"], m["state"], gathered + m["deferred"]
    else:
        stage, offload = int(engine[4]), engine.endswith("+offload")
        weights = chunk(w, world) if stage == 3 else w
        grads = (w if stage == 1 else chunk(w, world)) + min(DS_BUCKET_BYTES, w)
        state = 0 if offload else chunk(w, world) + chunk(m["state"], world)
        transient = gathered if stage == 3 else 0
    total = weights + grads + state + m["activations"] + transient
    return dict(
        weights=weights, grads=grads, state=state, activations=m["activations"], transient=transient, total=total
    )


def rows(flavors: list[str], ranks: list[int], micro_batch: int | None, seq_len: int) -> list[dict[str, Any]]:
    out = []
    for flavor in flavors:
        model_cfg = ModelConfig.from_flavor(flavor)
        layout = layout_bytes(model_cfg)
        mb = micro_batch or DEFAULT_MICRO_BATCH.get(flavor, 8)
        for label, kw in OPTIMIZERS.items():
            extra = {"rank": model_cfg.d_model // 4} if kw["name"] in ("galore_adamw", "adamem") else {}
            optim_cfg = OptimConfig(**{**kw, **extra})
            for fused in (False, True) if kw["name"] in ("adalomo", "adafactor") else (False,):
                for world in ranks:
                    m = measure(model_cfg, optim_cfg, fused, mb, seq_len, "meta", shard_ranks=world)
                    for engine in _engines(kw["name"], fused) if world > 1 else ("ddp",):
                        if engine.startswith("ds-"):
                            r = per_rank_deepspeed(engine, world, m, layout)
                        else:
                            r = per_rank(engine, world, fused, m, layout)
                        out.append(
                            dict(flavor=flavor, optimizer=label, fused=fused, engine=engine if world > 1 else "-")
                            | dict(ranks=world, micro_batch=mb, formula=m["formula"], **r)
                        )
    return out


def _engines(optimizer: str, fused: bool) -> list[str]:
    """The multi-rank engines (and DeepSpeed set-ups) that run `optimizer` (trainer/engines.py)."""
    out = [e for e in ("ddp", "fsdp2") if support(optimizer, e).status != "refused"]
    if optimizer == "adamw" and not fused:
        out += ["ds-z1", "ds-z2", "ds-z3", "ds-z3+offload"]
    if optimizer == "adalomo" and fused:
        out.append("ds-z3-lomo")
    return out


def print_table(table: list[dict[str, Any]], seq_len: int) -> None:
    print(f"per-rank peak memory of one training step, seq {seq_len}, fp32 weights/state/activations, accounted on")
    print("the meta device (tools/bench_engines.py docstring); GiB; formula = the unsharded one-rank sum")
    print(
        "| model | micro-batch | optimizer | fused | engine | ranks | weights | grads | state | activations | "
        "transient | **per rank** | formula (1 rank) | fits 80 GB |"
    )
    print("|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in table:
        g = {k: r[k] / GiB for k in ("weights", "grads", "state", "activations", "transient", "total", "formula")}
        fits = "yes" if g["total"] < H100_GIB * 0.9 else "no"
        print(
            f"| {r['flavor']} | {r['micro_batch']} | {r['optimizer']} | {'yes' if r['fused'] else 'no'} | "
            f"{r['engine']} | {r['ranks']} | {g['weights']:.2f} | {g['grads']:.2f} | {g['state']:.2f} | "
            f"{g['activations']:.2f} | {g['transient']:.2f} | **{g['total']:.2f}** | {g['formula']:.2f} | {fits} |"
        )


def main(argv: list[str] | None = None) -> None:
    ap = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavors", nargs="+", default=["550m", "llama_1b", "llama_7b"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--micro-batch", type=int, default=None, help="default: 550m 32 (its config), 1b 8, 7b 4")
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args(argv)
    print_table(rows(args.flavors, args.ranks, args.micro_batch, args.seq_len), args.seq_len)


if __name__ == "__main__":
    main()
