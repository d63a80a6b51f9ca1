"""Which optimizer runs on which engine (`train.engine`), and how: the one table behind the config
check and the docs (docs/engines.md holds `support_table_markdown()`; a test keeps them equal).

Engines (one process: no wrapper, whatever the engine):
- ddp: torch DistributedDataParallel; every rank holds the whole model, gradients and state.
- fsdp2: torch `fully_shard` per transformer block and on the root: parameters, gradients and
  optimizer state are row-sharded DTensors; the optimizers reduce their statistics over the shards
  (optim/sharding.py).
- deepspeed: DeepSpeed ZeRO, not built yet: every optimizer is refused with the reason. Its
  optimizer partitions are flat 1-D slices that cut through matrices, so the shape-aware optimizers
  can never run there as DeepSpeed's client optimizer; the plan is AdamW under ZeRO-1/2/3 and AdaLomo
  under ZeRO-3 the LOMO way (DeepSpeed shards the parameters and holds no optimizer; in-backward
  hooks update each rank's slice from the full gradient).

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
    "refused: ZeRO hands a client optimizer flat 1-D fp32 partitions that cut through matrices, so {what}; "
    "use --train.engine=fsdp2 (sharded, exact) or ddp"
)
_NOT_YET = "not built yet ({what} is open work of issue 11); use --train.engine=fsdp2 (sharded, exact) or ddp"
TABLE: dict[tuple[str, Engine], Support] = {
    ("adamw", "ddp"): Support("exact", "torch AdamW (fused on CUDA); every rank holds the whole state"),
    ("adamw", "fsdp2"): Support("exact", "torch AdamW on the row shards; state sharded 1/W"),
    ("adamw", "deepspeed"): Support("refused", _NOT_YET.format(what="the ZeRO-1/2/3 AdamW baseline")),
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
    ("adalomo", "deepspeed"): Support("refused", _NOT_YET.format(what="AdaLomo under ZeRO-3 the LOMO way")),
}
FUSED: dict[Engine, Support] = {
    "ddp": Support(
        "exact",
        "updates run from a DDP comm hook after each bucket's all-reduce; DDP keeps full-size buckets, so there "
        "is no gradient-memory saving (that needs fsdp2)",
    ),
    "fsdp2": Support("exact", "updates run from post-accumulate-grad hooks after the reduce-scatter; saving kept"),
    "deepspeed": Support("refused", "see above"),
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
