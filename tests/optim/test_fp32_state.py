"""fp32 optimizer state survives a checkpoint of a bf16 model: optim.fp32_state.FP32StateOptimizer.

torch.optim.Optimizer.load_state_dict would cast the state to the parameters' dtype (bf16); every
optimizer here keeps its state fp32, so it must come back fp32 and bit-identical, and the resumed
run must continue exactly as the uninterrupted one."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch

from optim import Adafactor, AdaLomo, AdaMeM, GaLoreAdamW
from optim.fp32_state import FP32StateOptimizer

SHAPES = [(12, 20), (20, 12), (16,)]


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).bfloat16()) for s in SHAPES]


def _lowrank_groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [
        {"params": [p for p in params if p.dim() == 2], "rank": 4, "update_proj_gap": 2},
        {"params": [p for p in params if p.dim() < 2]},
    ]


MAKERS: dict[str, Callable[[list[torch.nn.Parameter]], FP32StateOptimizer]] = {
    # bf16 matrices stay on Adafactor's reference code (the fast path is for fp32 weights)
    "adafactor_momentum": lambda ps: Adafactor(ps, lr=1e-2, beta1=0.9, weight_decay=0.1),
    "adalomo": lambda ps: AdaLomo(ps, lr=1e-2, weight_decay=0.1),
    "adalomo_svd2": lambda ps: AdaLomo(ps, lr=1e-2, factorization="svd", factor_rank=2),
    "adamem": lambda ps: AdaMeM(_lowrank_groups(ps), lr=1e-2),
    "galore_adamw": lambda ps: GaLoreAdamW(_lowrank_groups(ps), lr=1e-2, betas=(0.9, 0.95), eps=1e-8),
}


def _steps(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, seeds: range) -> None:
    for s in seeds:
        gen = torch.Generator().manual_seed(100 + s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        opt.step()


def _floating_state(opt: torch.optim.Optimizer) -> dict[tuple[int, str], torch.Tensor]:
    params = [p for g in opt.param_groups for p in g["params"]]
    return {
        (i, k): v
        for i, p in enumerate(params)
        for k, v in opt.state[p].items()
        if torch.is_tensor(v) and v.is_floating_point()
    }


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_bf16_params_state_stays_fp32_and_resume_is_exact(name):
    make = MAKERS[name]
    params = _params()
    opt = make(params)
    _steps(params, opt, range(3))
    saved_state = _floating_state(opt)
    assert saved_state and all(v.dtype == torch.float32 for v in saved_state.values())
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["optim"])
    loaded = _floating_state(opt2)
    assert loaded.keys() == saved_state.keys()
    for key, v in loaded.items():
        assert v.dtype == torch.float32, key
        assert torch.equal(v, saved_state[key]), key

    _steps(params, opt, range(3, 6))  # includes projector refreshes for the low-rank ones
    _steps(resumed, opt2, range(3, 6))
    for a, b in zip(params, resumed, strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
