"""The training loop: model + update strategy + data + schedule + eval + logging + checkpoints.

Holds no model code (model/) and no optimizer math (optim/): it wires them together in named
phases, each readable at once:

    Trainer(cfg, info)   build: data (checked first: it fails fastest), model wrapped by its engine,
                         update strategy, checkpointer, then restore() the latest checkpoint
    fit()                evaluate at step 0, then train_step() / check / log / evaluate / save until
                         max_steps or a stop signal
    train_step(step)     set_lr -> compute_gradients (forward/backward over micro-batches) ->
                         apply_update (finish_backward, commit); nothing read on the host
    check_steps()        at log, eval and checkpoint steps: read the unchecked steps' losses and norms
                         in one host sync; a non-finite one stops the run before anything is saved

Every update strategy (ordinary, fused in backward, DeepSpeed's: trainer/update.py) goes through the
same loop: no branch on train.fused_update or the engine here.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from data import TrainBatches, validation_batches
from model import Transformer, param_counts
from optim import OptimizerSpec, optimizer_keys, optimizer_spec
from optim.projected_backward import install_projected_backward, projected_linear_weight_names
from optim.state_bytes import measured_state_bytes
from trainer.checkpoint import (
    Checkpointer,
    RNGState,
    ShardedBackend,
    ShardedParts,
    TrainProgress,
    check_checkpoint_fits,
    latest_checkpoint,
    load_checkpoint,
)
from trainer.compile_toolchain import missing_compiler
from trainer.config import Config, ConfigError, deepspeed_config, micro_batch_per_rank, save_config, validate
from trainer.ddp_fused import install_fused_comm_hook
from trainer.deepspeed_engine import (
    DeepSpeedCheckpoints,
    GatheredModelState,
    StepInDeepSpeed,
    initialize_deepspeed,
    install_lomo_zero3,
)
from trainer.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    average_over_ranks,
    barrier,
    init_distributed,
    shutdown,
)
from trainer.flop_budget import config_flops, resolve_max_steps
from trainer.full_state import ModelState
from trainer.hardware import device_peak_flops, peak_memory_bytes
from trainer.lora import apply_adapters, parameter_counts
from trainer.metrics import MetricsLogger
from trainer.parallelize import autocast_context, grad_sync, parallelize, resolve_precision
from trainer.relora import build_adapter_schedule
from trainer.resume_policy import check_resume_compatible, record_resume
from trainer.run_lock import RunDirError, lock_run_dir, remove_stale_temp_files
from trainer.run_outcome import clear_diverged, mark_diverged
from trainer.schedule import lr_factor
from trainer.step import evaluate, forward_backward, split_micro_batches
from trainer.throughput_window import ThroughputWindow
from trainer.update import UpdateInBackward, build_update_strategy


class TrainingDiverged(RuntimeError):
    """Non-finite loss or gradient norm; the last good checkpoint is left untouched."""


@dataclass
class TrainResult:
    final_step: int
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    stopped_by_signal: bool = False
    checkpoint: Path | None = None


@dataclass
class StepOutput:
    """One step's metrics, on the device until the loop's next check reads them (one host sync for all
    the steps since the last check: no GPU stall inside a step)."""

    loss: torch.Tensor  # 0-d: global mean token loss
    grad_norm: torch.Tensor  # 0-d: before clipping
    lr_factor: float  # the schedule's multiplier of the peak lr


class StopFlag:
    """Set by SIGTERM/SIGINT (or `request()`); the loop finishes the current step, saves and exits cleanly."""

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.signalled = False  # a second Ctrl-C exits at once; a request() (closed console) is no first one
        self.announce = announce  # the main rank says what happens next (torchrun forwards the signal to every rank)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a worker thread)
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once, without saving
        first, self.signalled, self.requested = not self.signalled, True, True  # before a write that may fail
        if first and self.announce:
            again = " (Ctrl-C again: exit at once, without saving)" if signum == signal.SIGINT else ""
            # os.write, not print: a handler may run while the main code is inside a print of its own. Suppressed:
            # the same Ctrl-C may have ended stderr's reader (`2>&1 | tee log`), and the save must still happen.
            with contextlib.suppress(OSError):
                os.write(
                    2,
                    f"\n{signal.Signals(signum).name}: finishing this step, then saving and exiting{again}\n".encode(),
                )

    def request(self) -> None:
        """Stop as on SIGTERM (e.g. the console's reader went away)."""
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: Config) -> TrainResult:
    """Train `cfg` in its run directory, which this process (rank 0) locks for the whole run."""
    info = init_distributed(cfg.train.device)
    run_dir = Path(cfg.run.dir)
    try:
        if cfg.train.compile or cfg.optim.compile:
            problem = missing_compiler(info.device)
            if problem:
                raise ConfigError(problem)
        # Before anything reads or writes the run directory: a second trainer stops here.
        with lock_run_dir(run_dir) if info.is_main else contextlib.nullcontext():
            if info.is_main:
                removed = remove_stale_temp_files(run_dir, run_dir / "checkpoints")
                if removed:
                    print(
                        f"removed {len(removed)} temporary file(s) left by an interrupted run: "
                        + ", ".join(p.name for p in removed),
                        flush=True,
                    )
            return Trainer(cfg, info).fit()
    finally:
        shutdown(info)


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo):
        """Build everything, restore the latest checkpoint, wrap the model, open the logs."""
        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.run.dir)
        self.tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        self.micro_batch = micro_batch_per_rank(cfg.train, info.world_size)
        # load_config validated already; this covers a Config built in code (microseconds).
        validate(cfg, info.world_size)
        self.budget = resolve_max_steps(cfg)  # idempotent: changes nothing after load_config; says how for the header
        self.flops = config_flops(cfg)  # flops_seen: cumulative training FLOPs, exact per step
        self.resume_from, self.resume_state, self.resume_changes = self._check_resume()  # before any heavy work
        self._build_data()  # first: its checks (missing data, tokenizer mismatch) fail fastest
        self._build_model_and_updater()
        self.progress = TrainProgress()
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints",
            {
                "progress": self.progress,
                "model": self.model_state,
                "optimizer": self.updater,
                "data": self.data,
                "rng": RNGState(),
            },
            keep_last=cfg.checkpoint.keep_last,
            sharded=self.checkpoint_parts,
        )
        self.restore()
        self.autocast = autocast_context(cfg.train.precision, info.device)
        self.stop = StopFlag(announce=info.is_main)  # its signal handlers are installed by fit(), while it runs
        self.log = MetricsLogger(
            self.run_dir,
            enabled=info.is_main,
            tensorboard=cfg.log.tensorboard,
            resume_step=self.progress.step,
            on_stdout_closed=self.stop.request,  # a closed console must not crash the run: save and stop
        )
        self._print_run_header()
        self.unchecked: list[tuple[int, StepOutput]] = []  # steps whose metrics are still on the device
        self.result = TrainResult(final_step=self.progress.step)

    # ----- build -------------------------------------------------------------------------------
    def _build_data(self) -> None:
        cfg, info = self.cfg, self.info
        self.data = TrainBatches(
            cfg.data,
            global_batch=cfg.train.global_batch,
            rank=info.rank,
            world_size=info.world_size,
            pin_memory=info.device.type == "cuda",
        )
        self.val_batches = validation_batches(cfg.data, cfg.eval.batch_size)
        self._check_vocab()

    def _build_model_and_updater(self) -> None:
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.run.seed)
        self.model = Transformer(cfg.model).to(info.device)
        apply_adapters(self.model, cfg.adapter, seed=cfg.run.seed)  # adapter.method=none: nothing
        self.trainable_params = parameter_counts(self.model)["trainable"]  # before ZeRO-3 empties the parameters
        # Before the optimizer is built: fully_shard replaces the parameters by sharded DTensors.
        # The projected-backward weights are left out of DDP: the updater averages their gradients (often a carrier's).
        ddp_ignored: list[str] = []
        if cfg.optim.projected_backward and info.enabled:  # several ranks: ddp, as validate allows
            ddp_ignored = projected_linear_weight_names(self.model, optimizer_spec(self.model, cfg.optim).param_groups)
        self.wrapped_model = parallelize(self.model, cfg.train, info, ddp_ignored=ddp_ignored)
        params = [p for p in self.model.parameters() if p.requires_grad]
        spec = optimizer_spec(self.model, cfg.optim)
        # How checkpoints hold the model and optimizer (trainer/checkpoint.py): several ranks write DCP directories.
        self.model_state: Any = ModelState(self.model)  # a single file loads into FSDP2 shards too
        self.checkpoint_parts: ShardedBackend | None
        if cfg.train.engine == "deepspeed" and info.enabled:
            self._build_deepspeed(spec)
        else:
            averaged = [self.model.get_parameter(name) for name in ddp_ignored]
            self.updater = build_update_strategy(
                spec,
                params,
                fused=cfg.train.fused_update,
                max_grad_norm=cfg.train.max_grad_norm,
                average_over_ranks=functools.partial(average_over_ranks, info=info) if averaged else None,
                averaged=averaged,
            )
            # The updater's method, not a lambda over self: a closure over the Trainer would put it in a reference
            # cycle, which only the cycle collector frees, at a time of its choosing (the weights and optimizer
            # state of a finished Trainer would stay in memory until then).
            self.checkpoint_parts = ShardedParts(self.model, self.updater.optimizers, info)
        if isinstance(self.wrapped_model, DistributedDataParallel) and isinstance(self.updater, UpdateInBackward):
            install_fused_comm_hook(self.wrapped_model, self.updater.optimizer)  # update after the all-reduce
        if cfg.optim.projected_backward:  # GaLore's low-rank linears compute their projected gradient in backward
            install_projected_backward(self.model, self.updater.optimizer)
        self.adapters = build_adapter_schedule(self.model, self.updater, cfg.adapter, cfg.run.seed)

    def _build_deepspeed(self, spec: OptimizerSpec) -> None:
        """DeepSpeed's engine over the model (trainer/deepspeed_engine.py): AdamW as its client optimizer, or
        AdaLomo's fused updates on ZeRO-3 partitions (the config check allows only these)."""
        config = deepspeed_config(self.cfg, self.info.world_size)
        if self.cfg.optim.name == "adamw":
            client = spec.build()
            engine = initialize_deepspeed(self.model, config, self.info, optimizer=client)
            self.wrapped_model = engine
            self.updater = StepInDeepSpeed(engine, client)
            self.checkpoint_parts = DeepSpeedCheckpoints(engine, self.info)
            return
        self.deepspeed_engine = initialize_deepspeed(self.model, config, self.info)  # partitions the parameters
        self.updater = UpdateInBackward(spec)
        install_lomo_zero3(self.updater, self.info)
        self.wrapped_model = self.model  # the module itself: see trainer/deepspeed_engine.py
        self.model_state = GatheredModelState(self.model, self.info)
        self.checkpoint_parts = None  # single files, gathered

    def _engine_label(self) -> str:
        t = self.cfg.train
        if t.engine != "deepspeed":
            return t.engine
        return f"deepspeed ZeRO-{t.zero_stage}{' + CPU offload' if t.offload_optimizer else ''}"

    def _checkpoint_layout(self) -> str:
        """How this run saves (trainer.checkpoint.check_checkpoint_fits)."""
        if not self.info.enabled:
            return "file"
        if self.cfg.train.engine == "deepspeed":
            return "deepspeed" if self.cfg.optim.name == "adamw" else "gathered"
        return "dcp"

    def _check_vocab(self) -> None:
        data_vocab = self.data.manifest["tokenizer"]["vocab_size"]
        if data_vocab > self.cfg.model.vocab_size:
            raise ConfigError(
                f"the data's tokenizer has {data_vocab} ids but model.vocab_size={self.cfg.model.vocab_size}; "
                f"set --model.vocab_size to at least {data_vocab} (a multiple of 128 is fastest)"
            )

    def _check_resume(self) -> tuple[Path | None, dict[str, Any] | None, dict[str, tuple[Any, Any]]]:
        """(the checkpoint to resume from, its contents, the config changes since it), or Nones for a
        fresh run; a change that the run cannot take (trainer/resume_policy.py) is a ConfigError here."""
        latest = latest_checkpoint(self.run_dir / "checkpoints")
        if latest is not None and not self.cfg.checkpoint.resume:
            # Starting over beside them would mix two runs: the new run's checkpoints pruned by the old ones'
            # higher steps, config.yaml describing the new run, and a plain re-run resuming the old checkpoint.
            raise RunDirError(
                f"checkpoint.resume=false, but {self.run_dir} holds checkpoints of an earlier start (latest "
                f"{latest.name}): starting over there would mix two runs. Use another --run.dir, or delete "
                f"{self.run_dir} (or move it aside) to start this run over"
            )
        if latest is None:
            return None, None, {}
        state = load_checkpoint(latest)
        t = self.cfg.train
        check_checkpoint_fits(
            state,
            latest,
            engine=t.engine,
            world_size=self.info.world_size,
            layout=self._checkpoint_layout(),
            zero_stage=t.zero_stage,
        )
        return latest, state, check_resume_compatible(state.get("config", {}), self.cfg.to_dict(), latest)

    def restore(self) -> None:
        """Load the checkpoint found by _check_resume into every component."""
        if self.resume_from is not None:
            self.checkpointer.restore(self.resume_from, self.resume_state)
            self.resume_state = None  # the components own their copies now

    def _print_run_header(self) -> None:
        cfg, info = self.cfg, self.info
        counts = param_counts(cfg.model)
        trainable = self.trainable_params
        self.log.print(
            f"model {cfg.model.flavor}: {counts['total'] / 1e6:.1f}M parameters "
            f"({counts['non_embedding'] / 1e6:.1f}M non-embedding, {trainable / 1e6:.1f}M trainable), "
            f"{self.flops.per_token / 1e6:.1f} training MFLOPs/token | "
            f"optimizer {cfg.optim.name}{' (fused in backward)' if cfg.train.fused_update else ''} | "
            f"adapters: {self.adapters.describe()} | "
            f"{info.world_size} rank(s){f' ({self._engine_label()})' if info.enabled else ''} on {info.device.type} | "
            f"{cfg.train.global_batch} x {cfg.data.seq_len} "
            f"tokens/step, micro-batch {self.micro_batch} | data: {self.data.n_windows} windows/epoch"
        )
        if self.budget is not None:
            self.log.print(self.budget.describe())
        warmup = cfg.scheduler.warmup_steps
        if cfg.train.max_steps <= warmup and self.resume_from is None:  # said once, at the start
            self.log.print(
                f"warning: scheduler.warmup_steps={warmup} >= train.max_steps={cfg.train.max_steps}: the learning rate "
                f"warms up for the whole run (reaching optim.lr on its last step at most) and never decays; lower "
                f"--scheduler.warmup_steps (e.g. to {max(1, cfg.train.max_steps // 10)})"
            )
        sequences = cfg.train.max_steps * cfg.train.global_batch
        if sequences > self.data.n_windows:  # at every start: a resume may have raised max_steps past the data
            # Not an error (the order goes on into a reshuffled next epoch), but a comparison of optimizers assumes
            # each run sees fresh data: a FLOP-matched run longer than the data would re-read what it was trained on.
            needed = sequences * cfg.data.seq_len + 1  # n_windows = (tokens - 1) // seq_len
            self.log.print(
                f"warning: train.max_steps={cfg.train.max_steps} x train.global_batch={cfg.train.global_batch} = "
                f"{sequences:,} sequences is {sequences / self.data.n_windows:.2f} epochs of the prepared data "
                f"({self.data.n_windows:,} windows of data.seq_len={cfg.data.seq_len}): later steps repeat training "
                f"data; for one pass prepare at least {needed:,} tokens (tools/prepare_data.py --max_tokens {needed})"
            )
        if self.resume_from is not None:
            changed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in self.resume_changes.items())
            self.log.print(
                f"resumed from {self.resume_from} at step {self.progress.step}"
                + (f" with changed settings ({changed}; recorded in resumes.jsonl)" if changed else "")
            )

    def _record_start(self) -> None:
        """The run is starting for real: write the config in force and, on a resume, its history line."""
        if not self.info.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        clear_diverged(self.run_dir)  # started again (e.g. with a lower lr): no longer a diverged run
        if self.resume_from is not None:
            record_resume(self.run_dir, self.progress.step, self.resume_from, self.resume_changes)

    # ----- one step ------------------------------------------------------------------------------
    def train_step(self, step: int, inputs: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        """One optimizer step (`step` is 0-based) on this rank's share of the global batch."""
        factor = self.set_lr(step)
        loss = self.compute_gradients(inputs, targets)
        grad_norm = self.apply_update(step)
        return StepOutput(loss, grad_norm, factor)

    def set_lr(self, step: int) -> float:
        """The schedule's multiplier of the peak learning rates for 0-based `step`, set on the optimizer."""
        cfg = self.cfg
        factor = lr_factor(
            step,
            warmup_steps=cfg.scheduler.warmup_steps,
            max_steps=cfg.train.max_steps,
            final_lr_ratio=cfg.scheduler.final_lr_ratio,
        ) * self.adapters.lr_multiplier(step)
        self.updater.set_lr_factor(factor)
        return factor

    def compute_gradients(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward over the micro-batches (fused updates happen in there); the global mean token
        loss, a 0-d device tensor."""
        info = self.info
        loss = forward_backward(
            self.wrapped_model,
            split_micro_batches(
                inputs.to(info.device, non_blocking=True),
                targets.to(info.device, non_blocking=True),
                self.micro_batch,
            ),
            # Every packed window has seq_len targets; DDP averages gradients over ranks.
            loss_denominator=self.tokens_per_step / info.world_size,
            autocast=self.autocast,
            sync=functools.partial(grad_sync, self.wrapped_model),
            before_backward=self.updater.before_backward,
            backward=self.updater.backward,
            loss_chunk_tokens=self.cfg.train.loss_chunk_tokens,
        )
        # Each rank's loss is its tokens' summed CE over (global tokens / ranks): the global mean
        # token loss is the average over ranks (a collective on the device, not a host read).
        return (all_reduce_sum(loss, info) / info.world_size).detach()

    def apply_update(self, step: int) -> torch.Tensor:
        """The rest of the update after backward (ZeRO's or the optimizer's step; nothing left when fused);
        the gradient norm before clipping, a 0-d device tensor."""
        grad_norm = self.updater.finish_backward()
        self.updater.commit()
        self.adapters.after_commit(step + 1)  # ReLoRA's merge and restart; nothing otherwise
        return grad_norm.detach()

    def check_steps(self) -> tuple[float, float] | None:
        """Read the losses and norms of the steps since the last check (one host sync) and stop the run at
        the first non-finite one (TrainingDiverged, nothing saved). Called before every log line, evaluation
        and checkpoint, so a checkpoint never holds a step after a non-finite one. The last step's (loss, norm),
        or None when no step is unchecked."""
        if not self.unchecked:
            return None
        rows = torch.stack(
            [torch.stack([o.loss.float(), o.grad_norm.float().to(o.loss.device)]) for _, o in self.unchecked]
        )
        values = rows.tolist()
        steps = [step for step, _ in self.unchecked]
        self.unchecked = []
        for step, (loss, norm) in zip(steps, values, strict=True):
            self._check_finite(step, loss, norm)
        return values[-1][0], values[-1][1]

    def _check_finite(self, step: int, loss: float, grad_norm: float) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        message = (
            f"non-finite {what} at step {step} (loss {loss}, grad norm {grad_norm}); stopping without saving. "
            f"Last good checkpoint: {self.checkpointer.latest() or 'none'}. Likely causes with these settings: "
            + "; ".join(divergence_causes(self.cfg, step, self.info.device))
            + ". Fix the setting and re-run the same command: it resumes from the last good checkpoint."
        )
        if self.info.is_main:  # a result for tools that read run directories (tools/study.py), not a crash
            mark_diverged(self.run_dir, step, message)
        raise TrainingDiverged(message)

    # ----- evaluate, log, save -------------------------------------------------------------------
    def evaluate(self, step: int) -> None:
        """Evaluate at `step`; a stop request abandons it (marked pending: it runs first on resume)."""
        out = evaluate(
            self.model,
            self.val_batches,
            self.info,
            self.autocast,
            should_stop=self._stop_requested,
            loss_chunk_tokens=self.cfg.train.loss_chunk_tokens,
        )
        self.progress.eval_pending = out is None
        if out is None:
            self.log.print(
                f"step {step:>6}/{self.cfg.train.max_steps} | evaluation abandoned: stop requested "
                "(it runs first when the run resumes)"
            )
            return
        loss, ppl = out
        self.result.val_losses.append((step, loss))
        self.log.log(step, {"val/loss": loss, "val/ppl": ppl})
        self.log.print(f"step {step:>6}/{self.cfg.train.max_steps} | val loss {loss:.4f} | val ppl {ppl:.2f}")

    def log_step(
        self, done: int, out: StepOutput, checked: tuple[float, float], window: ThroughputWindow, elapsed: float
    ) -> None:
        """`checked`: this step's (loss, grad norm) as check_steps read them, just now; `window`: the steps since
        the device was last drained, which that read closed (trainer/throughput_window.py)."""
        seconds, steps = window.seconds(), window.steps(done)
        tok_s = self.tokens_per_step * steps / seconds
        values = {
            "train/loss": checked[0],
            "train/lr": self.cfg.optim.lr * out.lr_factor,
            "train/grad_norm": checked[1],
            "throughput/tokens_per_s": tok_s,
            "throughput/data_wait_frac": window.data_seconds / seconds,
            "memory/peak_bytes": float(peak_memory_bytes(self.info.device)),
            "tokens_seen": float(self.progress.tokens_seen),
            "flops_seen": float(self.flops.cumulative(done)),
            # Every tensor the optimizer holds, counted (microseconds): what the study's memory axis plots.
            "memory/optimizer_state_bytes": float(measured_state_bytes(self.updater.optimizer)),
        }
        peak = device_peak_flops(self.info.device)
        if peak is not None:
            # The FLOPs these steps executed (the projected backward and adapters count less; projector refreshes
            # the full backward), not the plain model's count, so MFU is not overstated for those runs.
            executed = self.flops.cumulative(done) - self.flops.cumulative(window.first_step)
            values["throughput/mfu"] = executed / (seconds * peak * self.info.world_size)
        values.update(self.updater.counters())
        self.log.log(done, values)
        max_steps = self.cfg.train.max_steps
        self.log.console(done, max_steps, values, elapsed, seconds / steps * (max_steps - done))

    def save(self) -> Path | None:
        """Checkpoint the current step: several ranks each write their part of a sharded directory, one
        process writes a single file; every rank waits for it. The path on the main rank. The steps since
        the last check are checked first: a non-finite one stops the run before anything is written."""
        self.check_steps()
        path = self.checkpointer.save_on_every_rank(self.progress.step, {"config": self.cfg.to_dict()}, self.info)
        barrier(self.info)
        return path

    def _stop_requested(self) -> bool:
        """On every rank: did any rank get SIGTERM/SIGINT? (a collective under DDP)"""
        return any_rank(self.stop.requested, self.info)

    # ----- fit -----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, result = self.cfg, self.result
        stop = self.stop
        stop.install()  # restored when fit() ends
        try:
            if self.progress.step >= cfg.train.max_steps and not self.progress.eval_pending:
                # With a budget, max_steps is derived from it (a given --train.max_steps is replaced).
                limit, knob = (
                    (f"train.flop_budget={cfg.train.flop_budget:.4g}", "--train.flop_budget")
                    if cfg.train.flop_budget is not None
                    else (f"train.max_steps={cfg.train.max_steps}", "--train.max_steps")
                )
                self.log.print(
                    f"run already complete at step {self.progress.step} ({limit}); to train longer raise {knob}, "
                    f"to start over use another --run.dir or delete {self.run_dir}"
                )
                return result
            self._record_start()
            if (cfg.eval.interval and self.progress.step == 0) or self.progress.eval_pending:
                self.evaluate(self.progress.step)
                if self.progress.eval_pending:  # abandoned by a stop request: keep it first for the resume
                    self._save_and_stop()
                    return result
            if self.progress.step >= cfg.train.max_steps:  # the final evaluation, abandoned before, is done now
                result.checkpoint = self.save()
                return result
            self._train_until_done(stop)
            return result
        finally:
            stop.restore()
            self.log.close()

    def _save_and_stop(self) -> None:
        result, step = self.result, self.progress.step
        result.checkpoint, result.stopped_by_signal = self.save(), True
        self.log.print(f"stop requested: saved {result.checkpoint or 'checkpoint'} at step {step}; exiting")

    def _train_until_done(self, stop: StopFlag) -> None:
        cfg, result = self.cfg, self.result
        batches = self.data.batches(self.progress.step)
        t_start = time.perf_counter()
        # Inside a step nothing waits for the device; the check points below read the metrics, and only there
        # is the time real on a GPU (the host ran ahead of the device before): throughput is timed between them.
        window = ThroughputWindow(self.progress.step)
        for step in range(self.progress.step, cfg.train.max_steps):
            t0 = time.perf_counter()
            inputs, targets = next(batches)
            window.data_seconds += time.perf_counter() - t0
            out = self.train_step(step, inputs, targets)
            self.unchecked.append((step + 1, out))
            self.progress.step = done = step + 1
            self.progress.tokens_seen += self.tokens_per_step
            result.final_step = done
            log_due = done % cfg.log.interval == 0 or done == cfg.train.max_steps
            eval_due = (cfg.eval.interval and done % cfg.eval.interval == 0) or done == cfg.train.max_steps
            save_due = done % cfg.checkpoint.interval == 0 or done == cfg.train.max_steps
            checked = self.check_steps() if log_due or eval_due or save_due else None
            if log_due:
                assert checked is not None
                self.log_step(done, out, checked, window, time.perf_counter() - t_start)
            if eval_due:
                self.evaluate(done)
            # One process reads its own flag; several ranks agree on it with a collective and a host read, at
            # the check points only (a SIGTERM waits at most log.interval steps).
            asked = (
                stop.requested if not self.info.enabled else checked is not None and any_rank(stop.requested, self.info)
            )
            if asked:
                self._save_and_stop()
                return
            if save_due:
                result.checkpoint = self.save()
            if checked is not None:  # the read drained the device: the next window starts now, after eval and save
                window = ThroughputWindow(done)


def divergence_causes(cfg: Config, step: int, device: torch.device) -> list[str]:
    """The settings of `cfg` (on `device`) that most often make a run diverge, worded as fixes (most
    likely first)."""
    o, t, causes = cfg.optim, cfg.train, []
    in_warmup = step <= cfg.scheduler.warmup_steps
    causes.append(
        f"the peak learning rate optim.lr={o.lr:g} is too high for {o.name}"
        + (" (this step was still in warmup)" if in_warmup else "")
        + f": try --optim.lr={o.lr / 3.16:.3g}"
    )
    if t.max_grad_norm == 0 and not t.fused_update:
        causes.append("gradient clipping is off (train.max_grad_norm=0): try --train.max_grad_norm=1.0")
    if cfg.scheduler.warmup_steps < min(100, t.max_steps // 20):
        causes.append(f"the warmup is short (scheduler.warmup_steps={cfg.scheduler.warmup_steps})")
    if "clip_threshold" in optimizer_keys(o.name) and o.name != "adalomo" and o.clip_threshold is None:
        causes.append("update clipping is off (optim.clip_threshold=null): try --optim.clip_threshold=1.0")
    if resolve_precision(t.precision, device) == "bf16":
        causes.append("bf16 autocast: try --train.precision=fp32 to rule out an overflow")
    return causes
