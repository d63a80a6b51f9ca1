"""Which optimizer runs on which engine (`train.engine`), and how: the one table behind the config
check and the docs (docs/engines.md holds `support_table_markdown()`; a test keeps them equal).

Engines (one process: no wrapper, whatever the engine):
- ddp: torch DistributedDataParallel; every rank holds the whole model, gradients and state.
- fsdp2: torch `fully_shard` per transformer block and on the root: parameters, gradients and
  optimizer state are row-sharded DTensors; the optimizers reduce their statistics over the shards
  (optim/sharding.py).
- deepspeed: DeepSpeed ZeRO (trainer/deepspeed_engine.py). AdamW is DeepSpeed's client optimizer at
  ZeRO-1/2/3 (optionally offloaded to the CPU). AdaLomo runs under ZeRO-3 the LOMO way: DeepSpeed
  shards the parameters and holds no optimizer; in-backward hooks all-reduce each full gradient,
  update the gathered parameter and keep this rank's slice. ZeRO's optimizer partitions are flat 1-D
  slices that cut through matrices, so the shape-aware optimizers never run there as its client.

Why each refusal (the message of `check_engine_supported` says it and names the way):
shape-aware optimizers under flattening ZeRO stages (GaLore issue #2, DeepSpeed #5309).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

Engine = Literal["ddp", "fsdp2", "deepspeed"]
ENGINES: tuple[Engine, ...] = typing.get_args(Engine)
# Registered optimizers that need each weight's 2-D gradient (factored statistics, SVD projectors).
SHAPE_AWARE = ("adafactor", "galore_adamw", "galore_adafactor", "adamem", "adalomo")


@dataclass(frozen=True)
class Support:
    status: Literal["exact", "supported", "refused"]
    how: str  # exact / supported: what runs and what it costs; refused: why, and the way


_FLAT = (
    "ZeRO hands a client optimizer flat 1-D fp32 partitions that cut through matrices, so {what}; "
    "use --train.engine=fsdp2 (sharded, exact) or ddp"
)
TABLE: dict[tuple[str, Engine], Support] = {
    ("adamw", "ddp"): Support("exact", "torch AdamW (fused on CUDA); every rank holds the whole state"),
    ("adamw", "fsdp2"): Support("exact", "torch AdamW on the row shards; state sharded 1/W"),
    ("adamw", "deepspeed"): Support(
        "exact",
        "torch AdamW as DeepSpeed's client optimizer on ZeRO's flat fp32 partitions, train.zero_stage 1/2/3; state "
        "sharded 1/W (stage 2: + gradients, 3: + parameters); train.offload_optimizer keeps state and step on the CPU",
    ),
    ("adafactor", "ddp"): Support("exact", "every rank repeats the same update"),
    ("adafactor", "fsdp2"): Support(
        "exact",
        "row statistics on the local rows; column statistics: one all-reduce of an n-vector per matrix; RMS "
        "terms: scalar all-reduces",
    ),
    ("adafactor", "deepspeed"): Support("refused", _FLAT.format(what="factored statistics would silently degrade")),
    ("galore", "ddp"): Support("exact", "every rank repeats the SVD (the same gradient, the same basis)"),
    ("galore", "fsdp2"): Support(
        "exact",
        "every T steps the full gradient is gathered on one owner rank per matrix, which runs the SVD and "
        "broadcasts the basis; a left projector costs one all-reduce of its r x n projected gradient per step",
    ),
    ("galore", "deepspeed"): Support("refused", _FLAT.format(what="an SVD of a partition is meaningless")),
    ("adamem", "ddp"): Support("exact", "every rank repeats the SVD (the same gradient, the same basis)"),
    ("adamem", "fsdp2"): Support(
        "exact",
        "SVD as GaLore's (owner rank, broadcast); per matrix and step one all-reduce of the r x n projected "
        "gradient and one of the residual's n column statistics (a tall matrix needs neither: its columns split)",
    ),
    ("adamem", "deepspeed"): Support("refused", _FLAT.format(what="an SVD of a partition is meaningless")),
    ("adalomo", "ddp"): Support("exact", "every rank repeats the same update"),
    ("adalomo", "fsdp2"): Support(
        "exact", "as Adafactor (factorization nmf, factor_rank 1); grouped/layerwise/global RMS: scalar all-reduces"
    ),
    ("adalomo", "deepspeed"): Support(
        "exact",
        "ZeRO-3 the LOMO way (train.zero_stage=3, train.fused_update=true): DeepSpeed shards the parameters; in "
        "backward each full gradient is all-reduced and the gathered parameter updated, this rank's slice kept; "
        "every rank holds the small factored state; update_norm grouped or none",
    ),
}
FUSED: dict[Engine, Support] = {
    "ddp": Support(
        "exact",
        "updates run from a DDP comm hook after each bucket's all-reduce; DDP keeps full-size buckets, so there "
        "is no gradient-memory saving (that needs fsdp2)",
    ),
    "fsdp2": Support("exact", "updates run from post-accumulate-grad hooks after the reduce-scatter; saving kept"),
    "deepspeed": Support(
        "exact",
        "AdaLomo only (ZeRO-3, see above): each gradient is all-reduced, used and freed in its hook, so no full set "
        "of gradients is held; AdamW steps after backward (ZeRO-2/3 shard its gradients instead)",
    ),
}


def family(optimizer: str) -> str:
    """The table's row of a registered optimizer name."""
    return "galore" if optimizer.startswith("galore_") else optimizer


def support(optimizer: str, engine: Engine) -> Support:
    return TABLE[(family(optimizer), engine)]


def check_engine_supported(
    *,
    engine: str,
    optimizer: str,
    world_size: int,
    factorization: str = "nmf",
    factor_rank: int = 1,
    adapter: str = "none",
    fused: bool = False,
    zero_stage: int = 2,
    offload_optimizer: bool = False,
    update_norm: str = "grouped",
    deepspeed_config: str | None = None,
) -> None:
    """ValueError naming the problem and the way, for every combination the table refuses."""
    if engine not in ENGINES:
        raise ValueError(f"train.engine={engine!r}: expected one of {ENGINES}")
    entry = support(optimizer, engine)  # narrowed to Engine by the check above
    if entry.status == "refused":
        raise ValueError(f"optim.name={optimizer} with train.engine={engine}: {entry.how}")
    if engine == "fsdp2" and world_size > 1:
        if optimizer == "adalomo" and not (factorization == "nmf" and factor_rank == 1):
            raise ValueError(
                f"optim.factorization={factorization} (factor_rank={factor_rank}) with train.engine=fsdp2: the rank-r "
                "factors of AdaLomo's ablation need the whole matrix on one rank; use --train.engine=ddp, or "
                "--optim.factorization=nmf --optim.factor_rank=1 (AdaLomo's own) under fsdp2"
            )
    if engine in ("fsdp2", "deepspeed") and adapter != "none":
        raise ValueError(
            f"adapter.method={adapter} with train.engine={engine}: the LoRA/ReLoRA baselines run on ddp "
            "(their memory is already small); use --train.engine=ddp"
        )
    if engine != "deepspeed":
        deepspeed_only = {
            "train.offload_optimizer=true (ZeRO-Offload)": offload_optimizer,
            f"train.deepspeed_config={deepspeed_config}": deepspeed_config is not None,
        }
        for key, given in deepspeed_only.items():
            if given:
                raise ValueError(
                    f"{key} applies to train.engine=deepspeed, not {engine}; remove it or use --train.engine=deepspeed"
                )
        return
    if optimizer == "adamw":
        if fused:
            raise ValueError(
                "train.fused_update=true with optim.name=adamw under train.engine=deepspeed: DeepSpeed's ZeRO "
                "optimizer steps after backward (ZeRO-2/3 shard the gradients instead); use "
                "--train.fused_update=false, or --train.engine=fsdp2 for fused AdamW"
            )
        return
    # adalomo: ZeRO-3 the LOMO way
    if zero_stage != 3 or not fused:
        raise ValueError(
            f"optim.name=adalomo with train.engine=deepspeed runs under ZeRO-3 with fused updates (the LOMO way: "
            f"DeepSpeed holds no optimizer), got train.zero_stage={zero_stage}, train.fused_update={fused}; use "
            "--train.zero_stage=3 --train.fused_update=true --train.max_grad_norm=0"
        )
    if offload_optimizer:
        raise ValueError(
            "train.offload_optimizer=true with optim.name=adalomo: DeepSpeed holds no optimizer state to offload "
            "(AdaLomo's factored state is m + n floats per matrix); remove it"
        )
    if update_norm not in ("grouped", "none"):
        raise ValueError(
            f"optim.update_norm={update_norm} with train.engine=deepspeed: a {update_norm} update waits for other "
            "tensors' gradients, and by then DeepSpeed has re-partitioned the parameter; use --optim.update_norm="
            "grouped (AdaLomo's own) or none, or --train.engine=fsdp2 / ddp for the ablation"
        )


def support_table_markdown() -> str:
    """The optimizer x engine table of docs/engines.md."""
    names = {"adamw": "AdamW", "adafactor": "Adafactor (± momentum)", "galore": "GaLore (AdamW / Adafactor)"}
    names |= {"adamem": "AdaMeM", "adalomo": "AdaLomo"}
    lines = ["| optimizer | " + " | ".join(ENGINES) + " |", "|---" * (len(ENGINES) + 1) + "|"]
    for fam, label in names.items():
        cells = [f"**{TABLE[(fam, e)].status}**: {TABLE[(fam, e)].how}" for e in ENGINES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = [f"**{FUSED[e].status}**: {FUSED[e].how}" for e in ENGINES]
    lines.append("| `train.fused_update` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
