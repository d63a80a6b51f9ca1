"""Peak memory of one training step, per optimizer, fused in backward or not; and step times.

    python tools/bench_memory.py                          # 210m and 550m, micro-batch 8 x 512
    python tools/bench_memory.py --flavors 210m --micro-batch 4 --optims adamw adalomo
    python tools/bench_memory.py --time                   # CPU step times (tiny model)

Memory is *accounted*, not sampled from an allocator, so it runs on the meta device (shapes
only: no RAM, no compute) and gives the same numbers as a real CPU or GPU run of the same
graph (tests/test_in_backward_memory.py checks meta == CPU on a small model):

- weights: parameter bytes; optimizer state: bytes of every tensor in the optimizer state after
  a first step (both paths allocate their state lazily);
- activations: tensors autograd saves for backward (saved-tensor hooks; one count per storage,
  parameters excluded), alive from their creation in forward until their node has run in backward;
- gradients: live `.grad` bytes, seen at every post-accumulate-grad event (the fused path frees
  each one right after its update); plus, for AdaLomo layerwise / global normalisation in the
  fused path, the deferred fp32 directions U;
- measured peak = weights + state + max over backward events of (activations + gradients + U).
  Not counted: transient temporaries inside a single autograd node or optimizer step
  (e.g. Adafactor's g^2 of one matrix), the allocator's fragmentation, CUDA context.

The formula column is the naive sum weights + gradients + state + activations (all gradients
for the ordinary path, the largest one for the fused path): it overestimates the ordinary path
slightly, because activations are freed during backward while gradients appear.
All tensors are fp32 (the trainer's weights and optimizer state); under bf16 autocast the
activations are roughly half.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import FLAVORS, ModelConfig, Transformer  # noqa: E402
from optim import REGISTRY, OptimConfig, optimizer_spec  # noqa: E402
from optim.in_backward import InBackwardOptimizer  # noqa: E402

GiB = 2**30


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl: shared by views, also on meta


class MemoryTracker:
    """Counts saved activations (by storage) and live gradients during one forward/backward."""

    def __init__(self, model: torch.nn.Module, deferred=lambda: 0):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.excluded = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
        self.deferred = deferred
        self.live: dict[int, list] = {}  # storage key -> [holders alive, bytes]
        self.act_bytes = 0
        self.act_peak = 0
        self.grad_peak = 0
        self.total_peak = 0  # activations + gradients + deferred, at gradient events
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _on_grad(self, _p) -> None:
        grads = sum(q.grad.nbytes for q in self.params if q.grad is not None)
        self.grad_peak = max(self.grad_peak, grads)
        self.total_peak = max(self.total_peak, self.act_bytes + grads + self.deferred())

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.act_bytes -= entry[1]
            del self.live[key]

    def pack(self, t: torch.Tensor):
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
    def unpack(holder):
        return holder.t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _state_bytes(opt) -> int:
    opts = opt.optimizers.values() if isinstance(opt, InBackwardOptimizer) else [opt]
    total = 0
    for o in opts:
        for st in o.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.dim() > 0:
                    total += v.nbytes
    return total


@contextlib.contextmanager
def _meta_values_stubbed(active: bool):
    """Some optimizers read a scalar on the host (.item(), float(), bool()); a meta tensor has no
    value, so hand back 1. Only the state's shapes matter here and they never depend on it."""
    if not active:
        yield
        return
    saved = {k: getattr(torch.Tensor, k) for k in ("item", "__float__", "__bool__", "__int__")}
    sdpa = F.scaled_dot_product_attention

    def flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        # On meta the dispatcher takes the math path, which saves the t x t attention matrix;
        # CPU and CUDA runs use a flash kernel, which saves q, k, v, out and the logsumexp only.
        if not q.is_meta or attn_mask is not None or kw:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal)[0]

    F.scaled_dot_product_attention = flash_sdpa

    def wrap(k, value):
        orig = saved[k]
        return lambda self, *a: value(self) if self.is_meta else orig(self, *a)

    torch.Tensor.item = wrap("item", lambda t: 1.0 if t.dtype.is_floating_point else 1)
    torch.Tensor.__float__ = wrap("__float__", lambda t: 1.0)
    torch.Tensor.__bool__ = wrap("__bool__", lambda t: True)
    torch.Tensor.__int__ = wrap("__int__", lambda t: 1)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(torch.Tensor, k, v)
        F.scaled_dot_product_attention = sdpa


def measure(model_cfg: ModelConfig, optim_cfg: OptimConfig, fused: bool, micro_batch: int, seq_len: int,
            device: str = "meta", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(model_cfg)
    # The tracker's gradient hooks go first, so they see each gradient before the fused update frees it.
    tracker = MemoryTracker(model)
    spec = optimizer_spec(model, optim_cfg)
    opt = InBackwardOptimizer(spec) if fused else spec.build()
    if fused:
        tracker.deferred = lambda: opt.deferred_bytes
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len + 1), generator=g).to(device)
    with _meta_values_stubbed(device == "meta"):
        for step in range(2):  # step 0 allocates the optimizer state; step 1 is measured
            if step == 1:
                tracker.act_peak = tracker.grad_peak = tracker.total_peak = 0
            if fused:
                opt.arm(True)
            with tracker.hooks():
                loss = _loss(model, tokens)
            act_at_forward_end = tracker.act_bytes
            loss.backward()
            del loss
            opt.step()
            opt.zero_grad(set_to_none=True)
    tracker.remove()
    params = [p for p in model.parameters()]
    weights = sum(p.nbytes for p in params)
    state = _state_bytes(opt)
    grads_formula = max(p.nbytes for p in params) if fused else weights
    deferred = opt.peak_deferred_bytes if fused else 0
    return dict(
        weights=weights,
        state=state,
        activations=max(tracker.act_peak, act_at_forward_end),
        grads_peak=tracker.grad_peak,
        deferred=deferred,
        peak=weights + state + max(tracker.total_peak, act_at_forward_end),
        formula=weights + grads_formula + deferred + state + tracker.act_peak,
    )


def _optim_cfg(name: str, **kw) -> OptimConfig:
    base = dict(name=name)
    if name == "adalomo":
        base.update(lr=1e-3, clip_threshold=1.0, beta2_decay=-0.8)
    base.update(kw)
    return OptimConfig(**base)


def memory_table(flavors, optims, micro_batch, seq_len, device) -> None:
    print(f"peak memory of one training step, micro-batch {micro_batch} x {seq_len} tokens, fp32, device={device}")
    print("GiB; peak = measured (weights + state + max over backward of live activations + gradients [+ deferred U]);")
    print("formula = weights + gradients (all; fused: largest one) + state + activations")
    hdr = f"{'model':>6} {'optimizer':<24} {'fused':>5} {'weights':>8} {'grads':>7} {'state':>7} {'activ':>7} {'defer':>6} {'peak':>7} {'formula':>8}"
    print(hdr)
    print("-" * len(hdr))
    for flavor in flavors:
        mcfg = ModelConfig.from_flavor(flavor, max_seq_len=max(seq_len, 512))
        for label, ocfg in optims:
            for fused in (False, True):
                try:
                    r = measure(mcfg, ocfg, fused, micro_batch, seq_len, device)
                except Exception as e:  # an optimizer that cannot run shape-only: say so, keep going
                    print(f"{flavor:>6} {label:<24} {str(fused):>5}  failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                print(
                    f"{flavor:>6} {label:<24} {str(fused):>5} {r['weights'] / GiB:8.3f} {r['grads_peak'] / GiB:7.3f} "
                    f"{r['state'] / GiB:7.3f} {r['activations'] / GiB:7.3f} {r['deferred'] / GiB:6.3f} "
                    f"{r['peak'] / GiB:7.3f} {r['formula'] / GiB:8.3f}"
                )
                sys.stdout.flush()


def time_steps(model_cfg: ModelConfig, optim_cfg: OptimConfig | None, fused: bool, micro_batch: int, seq_len: int,
               steps: int) -> float:
    """Median seconds per step (forward + backward + update) on CPU; optim_cfg None = no update."""
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    opt = None
    if optim_cfg is not None:
        spec = optimizer_spec(model, optim_cfg)
        opt = InBackwardOptimizer(spec) if fused else spec.build()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len + 1), generator=g)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        if fused:
            opt.arm(True)
        _loss(model, tokens).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        if step > 0:  # step 0 allocates state (and runs the first-step factorisation init)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_table(flavor, optims, micro_batch, seq_len, steps) -> None:
    mcfg = ModelConfig.from_flavor(flavor, max_seq_len=max(seq_len, 512))
    base = time_steps(mcfg, None, False, micro_batch, seq_len, steps)
    print(f"CPU step time, model {flavor}, micro-batch {micro_batch} x {seq_len}, median of {steps} steps, "
          f"{torch.get_num_threads()} thread(s); forward+backward alone: {base * 1e3:.1f} ms")
    print(f"{'optimizer':<28} {'plain ms':>9} {'fused ms':>9} {'fused/plain':>11} {'opt ms plain':>12} {'opt ms fused':>12}")
    for label, ocfg in optims:
        plain = time_steps(mcfg, ocfg, False, micro_batch, seq_len, steps)
        fused = time_steps(mcfg, ocfg, True, micro_batch, seq_len, steps)
        print(f"{label:<28} {plain * 1e3:9.1f} {fused * 1e3:9.1f} {fused / plain:11.3f} "
              f"{(plain - base) * 1e3:12.1f} {(fused - base) * 1e3:12.1f}")
        sys.stdout.flush()


ADALOMO_GRID = [
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flavors", nargs="+", default=["210m", "550m"])
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--optims", nargs="+", default=None, help="registry names (default: all registered)")
    ap.add_argument("--adalomo-grid", action="store_true", help="also every AdaLomo ablation variant")
    ap.add_argument("--device", default="meta", help="meta (shape-only accounting) or cpu")
    ap.add_argument("--time", action="store_true", help="CPU step times instead of memory")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    names = args.optims or sorted(REGISTRY)
    optims = [(n, _optim_cfg(n)) for n in names]
    if args.adalomo_grid:
        optims += [(label, _optim_cfg("adalomo", **kw)) for label, kw in ADALOMO_GRID[1:]]
    if args.time:
        flavor = args.flavors[0] if args.flavors != ["210m", "550m"] else "tiny"
        time_table(flavor, optims, args.micro_batch, args.seq_len, args.steps)
    else:
        memory_table(args.flavors, optims, args.micro_batch, args.seq_len, args.device)


if __name__ == "__main__":
    main()
