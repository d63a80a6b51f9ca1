"""The training loop: model + optimizer + data + schedule + eval + logging + checkpoints.

Holds no model code (model/) and no optimizer math (optim/): it wires them together.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from data import TrainBatches, validation_batches
from model import Transformer, flops_per_token, param_counts
from optim import optimizer_spec
from optim.in_backward import InBackwardOptimizer, check_fused_supported
from trainer import checkpoint as ckpt
from trainer.config import Config, ConfigError, save_config
from trainer.distributed import DistInfo, all_reduce_sum, any_rank, barrier, init_distributed, shutdown
from trainer.hardware import device_peak_flops, peak_memory_bytes
from trainer.metrics import MetricsLogger
from trainer.parallelize import autocast_context, compile_blocks, unwrap, wrap_ddp
from trainer.schedule import lr_factor
from trainer.step import evaluate, forward_backward, split_micro_batches


class TrainingDiverged(RuntimeError):
    """Non-finite loss or gradient norm; the last good checkpoint is left untouched."""


@dataclass
class TrainResult:
    final_step: int
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    stopped_by_signal: bool = False
    checkpoint: Optional[Path] = None


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes the current step, saves and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once, without saving
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_config_against_checkpoint(cfg: Config, saved: dict, log: MetricsLogger) -> None:
    now = cfg.to_dict()
    changed = [
        f"{section}.{key}: {saved[section].get(key)!r} -> {value!r}"
        for section, values in now.items()
        for key, value in values.items()
        if section in saved and saved[section].get(key) != value
    ]
    if changed:
        log.print("warning: config differs from the checkpoint's: " + "; ".join(changed))


def optimizer_counters(optimizer) -> dict[str, float]:
    """Cumulative counters that low-rank optimizers keep in their state (projector refreshes,
    SVD failures that fell back to the previous projector), summed for the logs."""
    parts = list(optimizer.optimizers.values()) if isinstance(optimizer, InBackwardOptimizer) else [optimizer]
    return {
        f"optim/{name}": float(sum(getattr(opt, name, 0) for opt in parts))
        for name in ("proj_updates", "svd_failures")
        if any(hasattr(opt, name) for opt in parts)
    }


def train(cfg: Config) -> TrainResult:
    info = init_distributed(cfg.train.device)
    try:
        return _train(cfg, info)
    finally:
        shutdown(info)


def _train(cfg: Config, info: DistInfo) -> TrainResult:
    t = cfg.train
    device = info.device
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    per_rank_batch, rem = divmod(t.global_batch, info.world_size)
    if rem or per_rank_batch % t.micro_batch:
        raise ConfigError(
            f"train.global_batch={t.global_batch} must split into {info.world_size} rank(s) x whole micro-batches "
            f"of train.micro_batch={t.micro_batch}"
        )
    if t.fused_update:
        try:
            check_fused_supported(grad_clip=t.max_grad_norm, world_size=info.world_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    # Data first: its checks (missing data, tokenizer mismatch) should fail before any heavy work.
    data = TrainBatches(cfg.data, global_batch=t.global_batch, rank=info.rank, world_size=info.world_size,
                        pin_memory=device.type == "cuda")
    val_batches = validation_batches(cfg.data, cfg.eval.batch_size)
    data_vocab = data.manifest["tokenizer"]["vocab_size"]
    if data_vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"the data's tokenizer has {data_vocab} ids but model.vocab_size={cfg.model.vocab_size}; "
            f"set --model.vocab_size to at least {data_vocab} (a multiple of 128 is fastest)"
        )

    torch.manual_seed(cfg.run.seed)
    model = Transformer(cfg.model).to(device)
    spec = optimizer_spec(model, cfg.optim)
    optimizer = InBackwardOptimizer(spec) if t.fused_update else spec.build()
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])

    start_step, resumed_from = 0, None
    latest = ckpt.latest_checkpoint(ckpt_dir) if cfg.checkpoint.resume else None
    if latest is not None:
        state = ckpt.load_checkpoint(latest)
        model.load_state_dict(state["model"])
        configured_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        if ("in_backward" in state["optimizer"]) != t.fused_update:
            raise ckpt.CheckpointError(
                f"{latest} was saved with train.fused_update={not t.fused_update}; resume with "
                f"--train.fused_update={str(not t.fused_update).lower()} (the optimizer state layouts differ)"
            )
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"cannot restore the optimizer from {latest}: {e}") from None
        # The peak lr comes from the config, not the checkpoint, so --optim.lr can change on resume.
        for group, lr in zip(optimizer.param_groups, configured_lrs):
            group["initial_lr"] = lr
        data.check_resume(state["data"])
        ckpt.set_rng_state(state["rng"])
        start_step, resumed_from = state["step"], latest

    if t.compile:
        compile_blocks(model)
    ddp_model = wrap_ddp(model, info)
    autocast = autocast_context(t.precision, device)

    log = MetricsLogger(run_dir, enabled=info.is_main, tensorboard=cfg.log.tensorboard, resume_step=start_step)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed_from is not None:
            _check_config_against_checkpoint(cfg, state["config"], log)
        save_config(cfg, run_dir / "config.yaml")
    counts = param_counts(cfg.model)
    seq_len = cfg.data.seq_len
    flops_tok = flops_per_token(cfg.model, seq_len)
    peak = device_peak_flops(device)
    log.print(
        f"model {cfg.model.flavor}: {counts['total'] / 1e6:.1f}M parameters "
        f"({counts['non_embedding'] / 1e6:.1f}M non-embedding), {flops_tok / 1e6:.1f} MFLOPs/token | "
        f"optimizer {cfg.optim.name}{' (fused in backward)' if t.fused_update else ''} | "
        f"{info.world_size} rank(s) on {device.type} | "
        f"{t.global_batch} x {seq_len} tokens/step, micro-batch {t.micro_batch} | data: {data.n_windows} windows/epoch"
    )
    if resumed_from is not None:
        log.print(f"resumed from {resumed_from} at step {start_step}")

    stop = _StopFlag()
    stop.install()
    result = TrainResult(final_step=start_step)
    tokens_per_step = t.global_batch * seq_len
    loss_denominator = tokens_per_step / info.world_size  # every packed window has seq_len targets
    params = [p for p in model.parameters() if p.requires_grad]
    no_sync = getattr(ddp_model, "no_sync", None)
    arm = optimizer.arm if t.fused_update else None
    batches = data.batches(start_step)
    t_start = time.perf_counter()
    step_times: list[float] = []

    def run_eval(step: int) -> None:
        loss, ppl = evaluate(unwrap(ddp_model), val_batches, info, autocast)
        result.val_losses.append((step, loss))
        log.log(step, {"val/loss": loss, "val/ppl": ppl})
        log.print(f"step {step:>6}/{t.max_steps} | val loss {loss:.4f} | val ppl {ppl:.2f}")

    def save(step: int) -> Path:
        path = None
        if info.is_main:
            path = ckpt.save_checkpoint(
                ckpt_dir,
                step,
                {
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": {"step": step},
                    "step": step,
                    "tokens_seen": step * tokens_per_step,
                    "data": data.state(step),
                    "rng": ckpt.rng_state(),
                    "config": cfg.to_dict(),
                },
                cfg.checkpoint.keep_last,
            )
        barrier(info)
        return path

    try:
        if start_step >= t.max_steps:
            log.print(f"run already complete at step {start_step} (train.max_steps={t.max_steps}); to train "
                      f"longer raise --train.max_steps, to start over use another --run.dir or delete {run_dir}")
            return result
        if cfg.eval.interval and start_step == 0:
            run_eval(0)
        for step in range(start_step, t.max_steps):
            t0 = time.perf_counter()
            inputs, targets = next(batches)
            t_data = time.perf_counter() - t0
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)

            lr_scale = lr_factor(step, warmup_steps=cfg.scheduler.warmup_steps, max_steps=t.max_steps,
                                 final_lr_ratio=cfg.scheduler.final_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lr_scale

            loss = forward_backward(
                ddp_model,
                split_micro_batches(inputs, targets, t.micro_batch),
                loss_denominator=loss_denominator,
                autocast=autocast,
                no_sync=no_sync,
                before_backward=arm,
            )
            if t.fused_update:
                optimizer.step()  # finishes updates deferred to the end of backward (AdaLomo layerwise/global)
                grad_norm = math.sqrt(optimizer.grad_sq_sum) if not optimizer.nonfinite else math.inf
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                if t.max_grad_norm > 0:
                    torch.nn.utils.clip_grads_with_norm_(params, t.max_grad_norm, norm)
                grad_norm = norm.item()
            # Each rank's loss is its tokens' summed CE over (global tokens / ranks), as DDP averages
            # gradients; the global mean token loss is the average over ranks.
            loss_value = all_reduce_sum(loss, info).item() / info.world_size
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                last = ckpt.latest_checkpoint(ckpt_dir)
                raise TrainingDiverged(
                    f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} at step {step + 1} "
                    f"(loss {loss_value}, grad norm {grad_norm}); stopping without saving. "
                    f"Last good checkpoint: {last or 'none'}. Lower --optim.lr or enable --train.max_grad_norm."
                )
            if not t.fused_update:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            done = step + 1
            step_time = time.perf_counter() - t0
            step_times.append(step_time)
            result.final_step = done
            if done % cfg.log.interval == 0 or done == t.max_steps:
                recent = step_times[-cfg.log.interval:]
                avg = sum(recent) / len(recent)
                tok_s = tokens_per_step / avg
                values = {
                    "train/loss": loss_value,
                    "train/lr": cfg.optim.lr * lr_scale,
                    "train/grad_norm": grad_norm,
                    "throughput/tokens_per_s": tok_s,
                    "throughput/data_wait_frac": t_data / step_time,
                    "memory/peak_bytes": float(peak_memory_bytes(device)),
                    "tokens_seen": float(done * tokens_per_step),
                }
                if peak is not None:
                    values["throughput/mfu"] = flops_tok * tok_s / (peak * info.world_size)
                values.update(optimizer_counters(optimizer))
                log.log(done, values)
                elapsed = time.perf_counter() - t_start
                log.console(done, t.max_steps, values, elapsed, avg * (t.max_steps - done))
            if (cfg.eval.interval and done % cfg.eval.interval == 0) or done == t.max_steps:
                run_eval(done)
            if any_rank(stop.requested, info):
                result.checkpoint = save(done)
                result.stopped_by_signal = True
                log.print(f"stop requested: saved {result.checkpoint or 'checkpoint'} at step {done}; exiting")
                return result
            if done % cfg.checkpoint.interval == 0 or done == t.max_steps:
                result.checkpoint = save(done)
        return result
    finally:
        stop.restore()
        log.close()
