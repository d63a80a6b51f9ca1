"""trainer/memory_accounting.py (tools/bench_memory.py's numbers): the meta-device (shape-only) run
gives the CPU run's numbers, and fused updates keep at most one gradient alive."""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig
from optim import OptimConfig
from trainer.memory_accounting import measure

torch.set_num_threads(1)

CFG = ModelConfig(d_model=64, n_layers=2, vocab_size=512, max_seq_len=32)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    "optim", [dict(name="adamw"), dict(name="adalomo"), dict(name="adalomo", update_norm="layerwise")]
)
def test_meta_accounting_equals_cpu(optim, fused):
    cfg = OptimConfig(**optim)
    on_cpu = measure(CFG, cfg, fused, micro_batch=2, seq_len=16, device="cpu")
    on_meta = measure(CFG, cfg, fused, micro_batch=2, seq_len=16, device="meta")
    assert on_cpu == on_meta
    assert on_cpu["activations"] > 0 and on_cpu["state"] > 0


def test_fused_peak_below_ordinary():
    cfg = OptimConfig(name="adalomo")
    plain = measure(CFG, cfg, False, micro_batch=2, seq_len=16, device="meta")
    fused = measure(CFG, cfg, True, micro_batch=2, seq_len=16, device="meta")
    assert plain["grads_peak"] == plain["weights"]  # every gradient alive at once
    assert fused["grads_peak"] == 512 * 64 * 4  # the largest parameter's gradient (embedding / head)
    assert fused["peak"] < plain["peak"]
