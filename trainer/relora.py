"""ReLoRA (Lialin et al. 2023, "ReLoRA: High-Rank Training through Low-Rank Updates"): LoRA whose
adapters are merged into the frozen weights and restarted every `adapter.reset_interval`
optimizer steps, so that the sum of many rank-r updates can reach a high rank.

The trainer drives an `AdapterSchedule` with two calls per step and no branch on the method:

    factor = lr_factor(step, ...) * schedule.lr_multiplier(step)     before the step's update
    ... forward / backward / updater.commit() ...
    schedule.after_commit(step + 1)                                    after the step's update

`AdapterSchedule` itself is the no-op of adapter.method none and lora; `ReLoRASchedule` does, after
the commit of every step whose count `done` is a multiple of T = reset_interval (restart k = done / T):

1. merge: W += (alpha / r) B A in fp32, B <- 0 (trainer.lora.merge_adapters; function unchanged);
2. re-initialise: A <- Kaiming-uniform from the generator of (run.seed, k), B <- 0
   (trainer.lora.reinit_adapters): the same A in a resumed run, with no generator state saved;
3. reset the adapters' optimizer state (AdamW's exp_avg and exp_avg_sq, the keys ReLoRA's code
   resets): `prune` keeps, in each of these tensors separately, its keep = numel - floor(prune_ratio
   x numel) largest-magnitude entries and zeroes the others (ReLoRA's magnitude pruning; exact count,
   ties broken by torch.topk); `zero` zeroes them. The embedding's, norms' and output layer's
   state is untouched.
   AdamW's per-parameter `step` is kept, as ReLoRA's code keeps it: the bias corrections
   1 - beta^step stay ~1, so the restarted moments are not inflated as at a true Adam start
   (with zeroed moments the first update is (1 - beta1) g / sqrt(1 - beta2) |g| ~ 0.45 sign(g) for
   beta2 0.95, instead of sign(g)): together with the jagged warmup below, a gentle restart. It
   also keeps the `prune` and `zero` modes on one footing (the surviving entries of `prune` were
   accumulated under that step count).
4. jagged lr: the update of step s (0-based) after restart k >= 1 (k = s // T) has its lr factor
   multiplied by min(1, (s - k T + 1) / restart_warmup_steps) (1 when restart_warmup_steps = 0, and
   before the first restart). The first update after a restart uses 1 / restart_warmup_steps of the
   schedule, never 0 (the convention of trainer.schedule.lr_factor's warmup; ReLoRA's code starts
   at 0, i.e. one update with lr 0, which only moves the moments). The schedule under it is the
   run's ordinary warmup + cosine (ReLoRA's code warms up to the cosine's value at the end of the
   restart warmup: within one restart warmup the two differ by the cosine's change over those steps).

Everything is a function of the step, run.seed and the saved parameters / optimizer state, so a run
resumed from any checkpoint (before or after a restart) continues bit for bit on the CPU.

Not built: ReLoRA's full-rank warm start (the paper trains the first few thousand steps
full-rank, then switches to ReLoRA): here the adapters train from the random initialisation at
step 0. ReLoRA's reset is defined for Adam's moments: trainer/config.py accepts
adapter.method=relora with optim.name=adamw only.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.lora import adapter_parameters, lora_modules, merge_adapters, reinit_adapters
from trainer.update import UpdateStrategy

if TYPE_CHECKING:
    from trainer.config import AdapterConfig

# The optimizer state a restart resets (torch.optim.AdamW's moments; ReLoRA's `optimizer_state_keys`).
RESET_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def jagged_lr_multiplier(step: int, *, reset_interval: int, restart_warmup_steps: int) -> float:
    """Multiplier of the schedule's lr factor for the update of `step` (0-based): see item 4 of the
    module docstring."""
    restart = step // reset_interval
    if restart == 0 or restart_warmup_steps <= 0:
        return 1.0
    return min(1.0, (step - restart * reset_interval + 1) / restart_warmup_steps)


def kept_entries(numel: int, prune_ratio: float) -> int:
    """How many entries a prune reset keeps: numel - floor(prune_ratio * numel). The product is
    rounded to 6 decimals first, so a ratio like 0.29 x 100 = 28.999999999999996 counts as 29."""
    return numel - math.floor(round(prune_ratio * numel, 6))


@torch.no_grad()
def prune_by_magnitude_(t: torch.Tensor, prune_ratio: float) -> None:
    """Zero, in place, all but the `kept_entries(t.numel(), prune_ratio)` largest-|.| entries of `t`."""
    keep = kept_entries(t.numel(), prune_ratio)
    if keep >= t.numel():
        return
    flat = t.view(-1)  # optimizer state tensors are contiguous
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask[torch.topk(flat.abs(), keep, sorted=False).indices] = True
    flat.masked_fill_(~mask, 0)


def reset_optimizer_state(updater: UpdateStrategy, params: list[nn.Parameter], mode: str, prune_ratio: float) -> None:
    """Prune (`prune`) or zero (`zero`) RESET_STATE_KEYS of each parameter's optimizer state; `step`
    and every other entry are kept. Parameters not updated yet (empty state) are skipped."""
    if mode not in ("prune", "zero"):
        raise ValueError(f"unknown optimizer reset {mode!r}: prune or zero")
    for p in params:
        state = updater.state_of(p)
        for key in RESET_STATE_KEYS:
            value = state.get(key)
            if not torch.is_tensor(value):
                continue
            if mode == "zero":
                value.zero_()
            else:
                prune_by_magnitude_(value, prune_ratio)


class AdapterSchedule:
    """What the training loop calls for the adapters every step; this base class does nothing
    (adapter.method none and lora)."""

    def lr_multiplier(self, step: int) -> float:
        """Multiplier of the lr factor for the update of `step` (0-based)."""
        return 1.0

    def after_commit(self, steps_done: int) -> None:
        """Called once the update of step `steps_done - 1` is applied (before logging or saving)."""

    def describe(self) -> str:
        """One phrase for the run header."""
        return "none"


class LoRASchedule(AdapterSchedule):
    """Plain LoRA: adapters trained from step 0, never merged (only the header differs from none)."""

    def __init__(self, model: nn.Module, cfg: AdapterConfig):
        self.cfg = cfg
        self.n_modules = sum(1 for _ in lora_modules(model))

    def describe(self) -> str:
        c = self.cfg
        return f"{c.method} r={c.rank} alpha={c.alpha:g} dropout={c.dropout:g} on {self.n_modules} linears"


class ReLoRASchedule(LoRASchedule):
    """LoRA with merge-and-restart every `cfg.reset_interval` steps (see the module docstring)."""

    def __init__(self, model: nn.Module, updater: UpdateStrategy, cfg: AdapterConfig, seed: int):
        super().__init__(model, cfg)
        self.model, self.updater, self.seed = model, updater, seed
        self.resets_done = 0  # in this process (for tests and logs; not needed to resume)

    def lr_multiplier(self, step: int) -> float:
        return jagged_lr_multiplier(
            step, reset_interval=self.cfg.reset_interval, restart_warmup_steps=self.cfg.restart_warmup_steps
        )

    def after_commit(self, steps_done: int) -> None:
        if steps_done % self.cfg.reset_interval:
            return
        merge_adapters(self.model)
        reinit_adapters(self.model, seed=self.seed, reset_index=steps_done // self.cfg.reset_interval)
        reset_optimizer_state(
            self.updater, adapter_parameters(self.model), self.cfg.optimizer_reset, self.cfg.prune_ratio
        )
        self.resets_done += 1

    def describe(self) -> str:
        c = self.cfg
        reset = f"prune {c.prune_ratio:g}" if c.optimizer_reset == "prune" else "zero"
        return (
            f"{super().describe()}, merged every {c.reset_interval} steps (optimizer reset: {reset}, "
            f"restart warmup {c.restart_warmup_steps})"
        )


def build_adapter_schedule(model: nn.Module, updater: UpdateStrategy, cfg: AdapterConfig, seed: int) -> AdapterSchedule:
    """The schedule of `cfg.method` for a model already transformed by trainer.lora.apply_adapters."""
    if cfg.method == "relora":
        return ReLoRASchedule(model, updater, cfg, seed)
    if cfg.method == "lora":
        return LoRASchedule(model, cfg)
    return AdapterSchedule()
