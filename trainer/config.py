"""The run configuration: typed dataclass sections, loaded from YAML and `--section.key=value`.

Resolution order: dataclass defaults < the model flavour's values (model.flavor) < the YAML file
(and the files it names with `base:`, relative to itself) < command-line overrides. Every key,
type and choice is checked when the config loads (trainer/config_parsing.py), and so is every
cross-key rule that needs no data or device (`validate`), including the chosen optimizer's
(optim.validate_optim_config): a bad config fails before any data or model work. Each field's
doc is the string under it; `python train.py --help` prints them all (`help_text`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from data import DataConfig
from model import DEFAULT_CHUNK_TOKENS, FLAVORS, ModelConfig
from optim import OptimConfig, optimizer_keys, validate_optim_config
from optim.in_backward import check_fused_supported
from optim.projected_backward import check_projected_backward_supported
from trainer.config_parsing import (
    ConfigError,
    build_section,
    describe_type,
    field_docs,
    field_types,
    merge,
    parse_overrides,
    read_yaml,
    suggest,
)
from trainer.deepspeed_config import build_deepspeed_config
from trainer.engines import Engine, check_engine_supported
from trainer.flop_budget import resolve_max_steps
from trainer.run_lock import write_file_atomic

__all__ = ["Config", "ConfigError", "help_text", "load_config", "parse_overrides", "save_config"]


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, TensorBoard events, checkpoints/."""
    seed: int = 0
    """Seed of the model initialisation (the data order has its own, data.seed)."""


@dataclass
class SchedulerConfig:
    warmup_steps: int = 2500
    """Linear warmup from 0 to optim.lr over this many optimizer steps."""
    final_lr_ratio: float = 0.1
    """Cosine decay ends at final_lr_ratio * optim.lr on the last step (OLMo's default 0.1)."""


@dataclass
class TrainConfig:
    max_steps: int = 8000
    """Optimizer steps of the whole run (derived from flop_budget when that is set)."""
    flop_budget: float | None = None
    """Training FLOPs of the whole run; when set, max_steps is derived from it (the most steps within it, counting the
    projected backward and adapters: trainer/flop_budget.py) and a given max_steps is replaced. null = off."""
    match_flops_of: str | None = None
    """Spend the FLOPs that this optimizer (a registered name; ordinary backward, no adapter) spends in max_steps
    steps: sets flop_budget, from which max_steps is derived (e.g. GaLore with projected_backward FLOP-matched to
    adamw). With flop_budget set (as in a saved config.yaml) it only records where the budget came from."""
    global_batch: int = 1024
    """Sequences per optimizer step, over all ranks."""
    micro_batch: int = 16
    """Sequences per forward/backward on one rank (accumulation fills the rest); capped at the rank's share."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU; master weights and optimizer state stay fp32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = CUDA when visible, else CPU."""
    fused_update: bool = False
    """Update each parameter inside backward and free its gradient at once (optim/in_backward.py)."""
    compile: bool = False
    """torch.compile every transformer block (needs a C++ compiler on CPU, a C compiler on CUDA: checked at start)."""
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    """The output layer and cross-entropy run this many tokens at a time, never holding the full logits (model/loss.py;
    at 64 x 512 tokens and the T5 vocabulary that saves GBs); 0 = the plain full-logits loss, which the model also
    takes by itself where it is the smaller: a micro-batch of no more tokens than model.d_model."""
    engine: Engine = "ddp"
    """Multi-rank engine (one process: no wrapper): ddp = DistributedDataParallel; fsdp2 = fully_shard per block and
    root (parameters, gradients and optimizer state row-sharded); deepspeed = DeepSpeed ZeRO (AdamW at zero_stage
    1/2/3, AdaLomo at stage 3 fused the LOMO way). Which optimizer runs where, and how: docs/engines.md
    (trainer/engines.py)."""
    zero_stage: Literal[1, 2, 3] = 2
    """engine=deepspeed: ZeRO stage. 1 = optimizer state sharded, 2 = + gradients, 3 = + parameters. AdaLomo needs 3."""
    offload_optimizer: bool = False
    """engine=deepspeed, AdamW: keep the ZeRO optimizer state and its step on the CPU (ZeRO-Offload)."""
    deepspeed_config: str | None = None
    """engine=deepspeed: a DeepSpeed JSON file merged into the one built from this config (for DeepSpeed's own tuning
    keys, e.g. zero_optimization.reduce_bucket_size). A key that this config also sets must agree with it; the
    optimizer, scheduler and precision stay this config's (trainer/deepspeed_config.py). null = built only."""


AdapterMethod = Literal["none", "lora", "relora"]
OptimizerReset = Literal["prune", "zero"]


@dataclass
class AdapterConfig:
    method: AdapterMethod = "none"
    """none = train every weight; lora = rank-r adapters on the blocks' linear layers, their base weights frozen
    (embedding, norms and output stay trainable; trainer/lora.py); relora = lora, merged into the base weights and
    restarted every reset_interval steps (trainer/relora.py; optim.name=adamw only)."""
    rank: int = 128
    """Adapter rank r, in [1, model.d_model] (ReLoRA's and GaLore's baselines: 128)."""
    alpha: float = 32.0
    """Adapter scaling: the adapter's output is multiplied by alpha / rank (ReLoRA's code: 32)."""
    dropout: float = 0.1
    """Dropout on the adapters' input, in [0, 1) (ReLoRA's code: 0.1; 0 = none)."""
    reset_interval: int = 2000
    """ReLoRA: merge the adapters into the base weights and re-initialise them every this many steps (paper's 1B
    runs: 5000 of 133k; 2000 suits the 8k-step runs here)."""
    optimizer_reset: OptimizerReset = "prune"
    """ReLoRA: on a reset, prune the adapters' AdamW moments to their largest-magnitude 1 - prune_ratio entries
    (prune) or zero them (zero); their step counters are kept."""
    prune_ratio: float = 0.999
    """ReLoRA: fraction of each adapter moment tensor zeroed by a prune reset (by magnitude), in [0, 1) (ReLoRA's
    README recommends 0.9 or a full reset)."""
    restart_warmup_steps: int = 50
    """ReLoRA: after a reset the lr rises linearly from 1/restart_warmup_steps of the schedule back to it over this
    many steps (jagged schedule; ReLoRA: 50-100); 0 = no restart warmup."""


@dataclass
class EvalConfig:
    interval: int = 500
    """Evaluate at step 0, every `interval` steps and at the end; 0 = only at the end."""
    batch_size: int = 16
    """Sequences per evaluation forward."""


@dataclass
class LogConfig:
    interval: int = 10
    """Console line and metrics every `interval` steps."""
    tensorboard: bool = True
    """Also write TensorBoard events to <run.dir>/tensorboard."""


@dataclass
class CheckpointConfig:
    interval: int = 1000
    """Save every `interval` steps (and at the end, and on SIGTERM/SIGINT)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted after a successful save."""
    resume: bool = True
    """Resume from the run directory's latest checkpoint if one exists. false: never resume; a run directory that
    holds checkpoints is then refused (starting over beside them would mix two runs)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def section_classes() -> dict[str, type]:
    """{section name: its dataclass}, in the order of Config's fields."""
    return dict(field_types(Config))  # a copy: the cached mapping is shared


def build_config(raw: dict) -> Config:
    sections = section_classes()
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r}.{suggest(name, sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of keys, got {values!r}")
    model_raw = dict(raw.get("model", {}))
    flavor = model_raw.get("flavor", ModelConfig.flavor)
    if flavor not in FLAVORS:
        raise ConfigError(f"unknown model.flavor {flavor!r}.{suggest(str(flavor), FLAVORS)}")
    raw = {**raw, "model": {**FLAVORS[flavor], **model_raw}}
    return Config(**{name: build_section(cls, raw.get(name, {}), name) for name, cls in sections.items()})


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """The validated config of a YAML file (or the defaults, for None) plus `--section.key=value`s."""
    return config_from_mapping(read_yaml(path) if path is not None else {}, overrides)


def config_from_mapping(raw: dict, overrides: typing.Sequence[str] = ()) -> Config:
    """load_config on a config file already read (`read_yaml`; not modified): a sweep validates hundreds of
    runs of a few files, and parsing the YAML is most of the cost."""
    cfg = build_config(merge(raw, parse_overrides(list(overrides))))
    validate(cfg)
    resolve_max_steps(cfg)  # train.flop_budget / match_flops_of -> max_steps, so the saved config holds both
    return cfg


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Cross-key checks that need no data or device. `world_size` defaults to torchrun's WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    t = cfg.train
    if not cfg.run.dir.strip():
        raise ConfigError("run.dir is empty: the run would write into the current directory; set --run.dir=runs/<name>")
    try:
        cfg.model.validate()
        validate_optim_config(cfg.optim)
        check_engine_supported(
            engine=t.engine,
            optimizer=cfg.optim.name,
            world_size=world,
            factorization=cfg.optim.factorization,
            factor_rank=cfg.optim.factor_rank,
            adapter=cfg.adapter.method,
            fused=t.fused_update,
            zero_stage=t.zero_stage,
            offload_optimizer=t.offload_optimizer,
            update_norm=cfg.optim.update_norm,
            deepspeed_config=t.deepspeed_config,
        )
        if t.fused_update:
            check_fused_supported(grad_clip=t.max_grad_norm)
        if t.engine == "deepspeed" and t.global_batch % world == 0:  # an uneven split gets its own message below
            deepspeed_config(cfg, world)  # the user's file read and checked now, before any heavy work
        if cfg.optim.projected_backward:
            check_projected_backward_supported(
                world_size=world, compile=t.compile, engine=t.engine, fused=t.fused_update
            )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
            f"raise --model.max_seq_len or lower --data.seq_len"
        )
    for key, value, least, note in (
        ("train.global_batch", t.global_batch, 1, ""),
        ("train.micro_batch", t.micro_batch, 1, ""),
        ("train.max_steps", t.max_steps, 1, ""),
        ("log.interval", cfg.log.interval, 1, ""),
        ("checkpoint.interval", cfg.checkpoint.interval, 1, ""),
        ("eval.interval", cfg.eval.interval, 0, " (0 = only at the end)"),
        ("data.seq_len", cfg.data.seq_len, 1, ""),
        ("data.num_workers", cfg.data.num_workers, 0, " (0 = load in the main process)"),
        ("data.seed", cfg.data.seed, 0, " (numpy's seeds are non-negative)"),
        ("run.seed", cfg.run.seed, 0, " (numpy's seeds are non-negative)"),
    ):
        if value < least:
            raise ConfigError(f"{key}={value} must be {'positive' if least else '>= 0'}{note}")
    per_rank, rem = divmod(t.global_batch, world)
    if rem or per_rank % micro_batch_per_rank(t, world):
        raise ConfigError(
            f"train.global_batch={t.global_batch} must split into {world} rank(s) x whole micro-batches "
            f"of train.micro_batch={t.micro_batch}"
        )
    _check_rank_fits_the_model(cfg)
    if t.loss_chunk_tokens < 0:
        raise ConfigError(f"train.loss_chunk_tokens={t.loss_chunk_tokens} must be >= 0 (0 = the full-logits loss)")
    if not (math.isfinite(t.max_grad_norm) and t.max_grad_norm >= 0):  # nan would switch clipping off silently
        raise ConfigError(f"train.max_grad_norm={t.max_grad_norm} must be a finite number >= 0 (0 disables clipping)")
    if cfg.scheduler.warmup_steps < 0 or not 0 <= cfg.scheduler.final_lr_ratio <= 1:
        raise ConfigError("scheduler.warmup_steps must be >= 0 and scheduler.final_lr_ratio in [0, 1]")
    if cfg.eval.batch_size <= 0:
        raise ConfigError(f"eval.batch_size={cfg.eval.batch_size} must be positive")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be at least 1 (the latest checkpoint is always kept)")
    _check_adapter(cfg)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON of this run on `world_size` ranks (trainer/deepspeed_config.py); ValueError on a bad
    train.deepspeed_config file."""
    t = cfg.train
    return build_deepspeed_config(
        global_batch=t.global_batch,
        micro_batch=micro_batch_per_rank(t, world_size),
        world_size=world_size,
        max_grad_norm=t.max_grad_norm,
        zero_stage=t.zero_stage,
        offload_optimizer=t.offload_optimizer,
        user_file=t.deepspeed_config,
    )


def micro_batch_per_rank(t: TrainConfig, world_size: int) -> int:
    """train.micro_batch, capped at the rank's share of the global batch: a config written for one
    rank (micro-batch = global batch) runs unchanged on several."""
    return max(1, min(t.micro_batch, t.global_batch // world_size))


def _check_rank_fits_the_model(cfg: Config) -> None:
    """Low-rank optimizers: a rank above the smaller side of every low-rank matrix is an error (the
    projection would silently be full rank). The smaller side of every 2-D weight here, embedding and
    output layer included, is model.d_model."""
    if "rank" in optimizer_keys(cfg.optim.name) and cfg.optim.rank > cfg.model.d_model:
        raise ConfigError(
            f"optim.rank={cfg.optim.rank} exceeds the smaller side of the low-rank matrices (model.d_model="
            f"{cfg.model.d_model}); use --optim.rank={cfg.model.d_model} or less (equal to d_model is full rank)"
        )


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically (a full disk is a RunDirError, never a torn file)."""
    write_file_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())


def help_text() -> str:
    """Every section and key with its type, default and doc (`python train.py --help`)."""
    lines = []
    for section, cls in section_classes().items():
        lines.append(f"\n{section}:")
        docs = field_docs(cls)
        hints = field_types(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
            shown = shown.removesuffix("\n...").removesuffix(" ...")
            lines.append(f"  --{section}.{f.name}  ({describe_type(hints[f.name])}, default {shown})")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


# The adapter keys each adapter.method reads (a non-default value of another key is an error, as for optim.*).
_ADAPTER_KEYS = {
    "none": (),
    "lora": ("rank", "alpha", "dropout"),
    "relora": ("rank", "alpha", "dropout", "reset_interval", "optimizer_reset", "prune_ratio", "restart_warmup_steps"),
}


def _check_adapter(cfg: Config) -> None:
    """adapter.*: value ranges, keys the method does not read, and the optimizers that can train adapters."""
    a, method = cfg.adapter, cfg.adapter.method
    defaults = AdapterConfig()
    ignored = [
        f"adapter.{f.name}={getattr(a, f.name)!r}"
        for f in dataclasses.fields(AdapterConfig)
        if f.name != "method"
        and f.name not in _ADAPTER_KEYS[method]
        and getattr(a, f.name) != getattr(defaults, f.name)
    ]
    if ignored:
        readers = "relora" if method == "lora" else "lora and relora"
        raise ConfigError(
            f"{', '.join(ignored)} set, but adapter.method={method} does not read it (only {readers} do); "
            f"drop it or set --adapter.method"
        )
    if method == "none":  # its keys are unread (and at their defaults, checked above): rank 128 may exceed d_model
        return
    ranges = [
        ("rank", 1 <= a.rank <= cfg.model.d_model, f"in [1, model.d_model={cfg.model.d_model}]"),
        ("alpha", math.isfinite(a.alpha) and a.alpha > 0, "a finite number > 0"),
        ("dropout", 0 <= a.dropout < 1, "in [0, 1)"),
        ("reset_interval", a.reset_interval >= 1, ">= 1"),
        ("prune_ratio", 0 <= a.prune_ratio < 1, "in [0, 1)"),
        ("restart_warmup_steps", a.restart_warmup_steps >= 0, ">= 0"),
    ]
    for key, ok, want in ranges:
        if not ok:
            raise ConfigError(f"adapter.{key}={getattr(a, key)!r} must be {want}")
    if "rank" in optimizer_keys(cfg.optim.name):  # galore_adamw, galore_adafactor, adamem
        raise ConfigError(
            f"adapter.method={method} with optim.name={cfg.optim.name}: a low-rank projection of low-rank adapters "
            f"is not a baseline; use --optim.name=adamw (or --adapter.method=none for {cfg.optim.name})"
        )
    if method == "relora" and cfg.optim.name != "adamw":
        raise ConfigError(
            f"adapter.method=relora resets AdamW's moments (exp_avg, exp_avg_sq) at each restart; "
            f"optim.name={cfg.optim.name} keeps other state. Use --optim.name=adamw, or --adapter.method=lora"
        )
