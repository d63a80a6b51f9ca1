"""Peak memory of one training step, accounted tensor by tensor: `measure(...)`.

Memory is *accounted*, not sampled from an allocator, so it runs on the meta device (shapes
only: no RAM, no compute) and gives the same numbers as a real CPU or GPU run of the same
graph (tests/optim/test_in_backward_memory.py checks meta == CPU on a small model):

- weights: parameter bytes; optimizer state: bytes of every tensor in the optimizer state after
  a first step (`optim.state_bytes.measured_state_bytes`; both paths allocate their state lazily);
- activations: tensors autograd saves for backward (saved-tensor hooks; one count per storage,
  parameters excluded), alive from their creation in forward until their node has run in backward;
- gradients: live `.grad` bytes, seen at every post-accumulate-grad event (the fused path frees
  each one right after its update); plus, for AdaLomo layerwise / global normalisation in the
  fused path, the deferred fp32 directions U;
- measured peak = weights + state + max over backward events of (activations + gradients + U).
  Not counted: transient temporaries inside a single autograd node or optimizer step
  (e.g. Adafactor's g^2 of one matrix), the allocator's fragmentation, CUDA context.

The formula is the naive sum weights + gradients + state + activations (all gradients for the
ordinary path, the largest one for the fused path): it overestimates the ordinary path slightly,
because activations are freed during backward while gradients appear.
The loss is the trainer's (`trainer.step.token_loss_sum`, chunked as train.loss_chunk_tokens: the
chunk's logits are a transient inside one autograd node, not counted; the hidden states' and the output
weight's gradients, which it keeps from forward to backward, are), without autocast: all tensors are
fp32 (the trainer's weights and optimizer state); under bf16 autocast the activations are
roughly half.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

from model import DEFAULT_CHUNK_TOKENS, ModelConfig, Transformer
from optim import OptimConfig, optimizer_spec
from optim.in_backward import InBackwardOptimizer
from optim.state_bytes import measured_state_bytes, state_bytes_per_rank
from trainer.config import AdapterConfig
from trainer.lora import apply_adapters
from trainer.step import token_loss_sum


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl: shared by views, also on meta


class _Holder:
    """What autograd keeps for a saved tensor: its lifetime is the saved tensor's lifetime."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t: torch.Tensor):
        self.t = t


class MemoryTracker:
    """Counts saved activations (by storage) and live gradients during one forward/backward.

    `deferred()` returns extra bytes alive at gradient events (the fused path's deferred U)."""

    def __init__(self, model: torch.nn.Module, deferred: Callable[[], int] = lambda: 0):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.excluded = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
        self.deferred = deferred
        self.live: dict[int, list[int]] = {}  # storage key -> [holders alive, bytes]
        self.act_bytes = 0
        self.act_peak = 0
        self.grad_peak = 0
        self.total_peak = 0  # activations + gradients + deferred, at gradient events
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _on_grad(self, _p: torch.Tensor) -> None:
        grads = sum(q.grad.nbytes for q in self.params if q.grad is not None)
        self.grad_peak = max(self.grad_peak, grads)
        self.total_peak = max(self.total_peak, self.act_bytes + grads + self.deferred())

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.act_bytes -= entry[1]
            del self.live[key]

    def pack(self, t: torch.Tensor) -> _Holder:
        holder = _Holder(t)
        key = _storage_key(t)
        if key not in self.excluded:
            if key in self.live:
                self.live[key][0] += 1
            else:
                self.live[key] = [1, t.untyped_storage().nbytes()]
                self.act_bytes += self.live[key][1]
                self.act_peak = max(self.act_peak, self.act_bytes)
            weakref.finalize(holder, self._release, key)
        return holder

    @staticmethod
    def unpack(holder: _Holder) -> torch.Tensor:
        return holder.t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def meta_values_stubbed(active: bool) -> Iterator[None]:
    """Make a shape-only (meta-device) step runnable; does nothing unless `active`.

    Some optimizers read a scalar on the host (.item(), float(), bool()); a meta tensor has no
    value, so hand back 1. Only the state's shapes matter here and they never depend on it.
    Attention: on meta the dispatcher would take the math path, which saves the t x t attention
    matrix; CPU and CUDA runs use a flash kernel, which saves q, k, v, out and the logsumexp only,
    so the flash kernel's CPU op is called instead. Both patches are undone on exit."""
    if not active:
        yield
        return
    sdpa = F.scaled_dot_product_attention

    def flash_sdpa(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        **kw: Any,
    ) -> torch.Tensor:
        if not q.is_meta or attn_mask is not None or kw:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal)[0]

    def on_meta(name: str, value: Callable[[torch.Tensor], Any]) -> Callable[..., Any]:
        orig = getattr(torch.Tensor, name)
        return lambda self, *a: value(self) if self.is_meta else orig(self, *a)

    host_values: dict[str, Callable[[torch.Tensor], Any]] = {
        "item": lambda t: 1.0 if t.dtype.is_floating_point else 1,
        "__float__": lambda t: 1.0,
        "__bool__": lambda t: True,
        "__int__": lambda t: 1,
    }
    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(F, "scaled_dot_product_attention", flash_sdpa))
        for name, value in host_values.items():
            patches.enter_context(mock.patch.object(torch.Tensor, name, on_meta(name, value)))
        yield


def measure(
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    fused: bool,
    micro_batch: int,
    seq_len: int,
    device: str = "meta",
    seed: int = 0,
    adapter: AdapterConfig | None = None,
    shard_ranks: int = 1,
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[str, int]:
    """Bytes of one training step (the second: the first allocates the optimizer state) of a
    `model_cfg` model with `optim_cfg`'s optimizer, fused in backward or not, on `micro_batch` x
    `seq_len` tokens: {weights, state, activations, grads_peak, deferred, peak, formula, state_sharded}
    (`state_sharded`: the state's bytes on one of `shard_ranks` ranks under FSDP2's row split). `adapter`:
    LoRA adapters on the model first (trainer/lora.py; frozen weights get no gradient nor state)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(model_cfg)
    if adapter is not None:
        apply_adapters(model, adapter, seed=seed)
    # The tracker's gradient hooks go first, so they see each gradient before the fused update frees it.
    tracker = MemoryTracker(model)
    spec = optimizer_spec(model, optim_cfg)
    in_backward = InBackwardOptimizer(spec) if fused else None
    opt = in_backward if in_backward is not None else spec.build()
    if in_backward is not None:
        tracker.deferred = lambda: in_backward.deferred_bytes
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len + 1), generator=g).to(device)
    act_at_forward_end = 0
    with meta_values_stubbed(device == "meta"):
        for step in range(2):  # step 0 allocates the optimizer state; step 1 is measured
            if step == 1:
                tracker.act_peak = tracker.grad_peak = tracker.total_peak = 0
            if in_backward is not None:
                in_backward.arm(True)
            with tracker.hooks():
                loss = token_loss_sum(model, tokens[:, :-1], tokens[:, 1:], contextlib.nullcontext(), loss_chunk_tokens)
            act_at_forward_end = tracker.act_bytes
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
    tracker.remove()
    params = list(model.parameters())
    weights = sum(p.nbytes for p in params)
    state = measured_state_bytes(opt)
    trainable = [p.nbytes for p in params if p.requires_grad]  # frozen LoRA base weights get no gradient
    grads_formula = max(trainable) if fused else sum(trainable)
    deferred = in_backward.peak_deferred_bytes if in_backward is not None else 0
    return dict(
        weights=weights,
        state=state,
        activations=max(tracker.act_peak, act_at_forward_end),
        grads_peak=tracker.grad_peak,
        deferred=deferred,
        peak=weights + state + max(tracker.total_peak, act_at_forward_end),
        formula=weights + grads_formula + deferred + state + tracker.act_peak,
        state_sharded=state_bytes_per_rank(opt, shard_ranks),
    )
