"""Step-for-step parity with independent references: HF transformers' Adafactor,
torch.optim.Adafactor and galore_torch 1.0 (GaLoreAdamW, GaLoreAdafactor), CPU fp32."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers.optimization import Adafactor as HFAdafactor

from optim import Adafactor, GaLoreAdafactor, GaLoreAdamW

SHAPES = [(12, 20), (20, 12), (16, 16), (8,)]
STEPS = 7


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _run(make_opt, groups_of, steps=STEPS, seed=0, start=None):
    """Run `steps` steps with seeded random gradients; return the parameter trajectory. `start`: the initial
    parameters (default: SHAPES, random)."""
    params = [torch.nn.Parameter(p.clone()) for p in (_params(seed) if start is None else start)]
    opt = make_opt(groups_of(params))
    gen = torch.Generator().manual_seed(seed + 1)
    traj = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        traj.append([p.detach().clone() for p in params])
    return traj


def _assert_close(a, b, atol=1e-6, rtol=1e-5):
    for step, (xs, ys) in enumerate(zip(a, b, strict=True), start=1):
        for x, y in zip(xs, ys, strict=True):

            def message(m: str, step: int = step) -> str:
                return f"step {step}: {m}"

            torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=message)


def _plain(params):
    return [{"params": params}]


HF_LIKE: dict[str, Any] = dict(
    beta1=None,
    beta2_decay=-0.8,
    eps=0.0,
    eps1=1e-30,
    eps2=1e-3,
    clip_threshold=1.0,
    scale_parameter=True,
    relative_step=True,
    momentum_style="hf",
)


def test_adafactor_matches_hf_and_torch():
    ours = _run(lambda g: Adafactor(g, lr=1e-2, **HF_LIKE), _plain)
    hf = _run(lambda g: HFAdafactor(g, lr=None), _plain)  # HF defaults: relative step, scale, clip 1, -0.8
    pt = _run(lambda g: torch.optim.Adafactor(g, lr=1e-2, eps=(1e-30, 1e-3), d=1.0, beta2_decay=-0.8), _plain)
    _assert_close(ours, hf)
    _assert_close(ours, pt)


def test_adafactor_warmup_init_matches_hf():
    # relative_step with warmup_init: the step size min(1e-6 * t, 1/sqrt(t)), scaled by the parameter's RMS.
    ours = _run(lambda g: Adafactor(g, lr=1e-2, **dict(HF_LIKE, warmup_init=True)), _plain)
    hf = _run(lambda g: HFAdafactor(g, lr=None, warmup_init=True), _plain)
    _assert_close(ours, hf)
    plain = _run(lambda g: Adafactor(g, lr=1e-2, **HF_LIKE), _plain)
    assert not torch.allclose(ours[-1][0], plain[-1][0])  # the warm-up changed the steps


@pytest.mark.parametrize("fast", [True, False])
def test_adafactor_with_adam_momentum_equals_torch_adamw_on_rank_one_gradients(fast):
    """The paper's Adafactor+momentum (momentum_style adam, constant beta2, no clipping or relative step) has no
    published implementation; torch's AdamW is its reference where factoring loses nothing. With rank-1
    gradients G_t = s_t a b^T, the factored second moment r c^T / sum(r) equals Adam's elementwise one exactly
    (r = sum_t w_t s_t^2 a^2 sum(b^2), c likewise), so both optimizers take the same steps, bias corrections,
    eps and decoupled weight decay included. A 1-D parameter is not factored: plain Adam."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, generator=gen), torch.randn(20, generator=gen)
    start = [torch.randn(12, 20, generator=gen), torch.randn(20, 12, generator=gen), torch.randn(20, generator=gen)]
    ours = [torch.nn.Parameter(w.clone()) for w in start]
    ref = [torch.nn.Parameter(w.clone()) for w in start]
    kw: dict[str, Any] = dict(lr=1e-2, eps=1e-8, weight_decay=0.1)
    opt = Adafactor(ours, beta1=0.9, beta2=0.95, momentum_style="adam", fast=fast, **kw)
    adamw = torch.optim.AdamW(ref, betas=(0.9, 0.95), **kw)
    ours_traj, ref_traj = [], []
    for t in range(6):
        s = (3.0 if t % 2 else 0.1) * (t + 1)  # the scale jumps: bias correction and eps both matter
        grads = [s * torch.outer(a, b), s * torch.outer(b, a), s * (1 + 0.1 * t) * b]
        for p, q, g in zip(ours, ref, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
        ours_traj.append([p.detach().clone() for p in ours])
        ref_traj.append([q.detach().clone() for q in ref])
    _assert_close(ours_traj, ref_traj)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_one_sided_adafactor_equals_its_closed_form(shape):
    """one_sided (AdaMeM's Algorithm 4 on the whole gradient) has no published implementation: its closed form
    in float64, from the module docstring. The statistic is kept on the larger side: one per column when
    m <= n (a square matrix included), else one per row."""
    lr, beta1, beta2, eps, eps1, wd = 1e-2, 0.9, 0.95, 1e-8, 1e-30, 0.1
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) * (t + 1) for t in range(5)]
    p = torch.nn.Parameter(w.float())
    opt = Adafactor([p], lr=lr, beta1=beta1, beta2=beta2, eps=eps, eps1=eps1, weight_decay=wd, one_sided=True)
    dim = 0 if shape[0] <= shape[1] else 1  # the mean over rows gives one value per column
    m = torch.zeros(shape, dtype=torch.float64)
    v = torch.zeros(shape, dtype=torch.float64).mean(dim=dim, keepdim=True)
    ours, expected = [], []
    for t, g in enumerate(grads, start=1):
        p.grad = g.float()
        opt.step()
        v = beta2 * v + (1 - beta2) * (g.square() + eps1).mean(dim=dim, keepdim=True)
        m = beta1 * m + (1 - beta1) * g
        u = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        w = w - lr * wd * w - lr * u
        ours.append([p.detach().double()])
        expected.append([w])
    _assert_close(ours, expected)
    assert opt.state[p]["exp_avg_sq_" + ("col" if dim == 0 else "row")].numel() == max(shape)


def test_adafactor_factors_3d_tensors_over_their_last_two_dims_like_hf_and_torch():
    """A 3-D tensor (stacked matrices) is factored per matrix over its last two dims, as HF and torch do: row
    statistics are means over the last dim, column statistics over the second last, mean(r) per matrix."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(3, 12, 20, generator=gen), torch.randn(2, 20, 12, generator=gen)]
    ours = _run(lambda g: Adafactor(g, lr=1e-2, **HF_LIKE), _plain, start=start)
    hf = _run(lambda g: HFAdafactor(g, lr=None), _plain, start=start)
    pt = _run(
        lambda g: torch.optim.Adafactor(g, lr=1e-2, eps=(1e-30, 1e-3), d=1.0, beta2_decay=-0.8), _plain, start=start
    )
    _assert_close(ours, hf)
    _assert_close(ours, pt)


def test_scale_parameter_moves_a_zero_matrix_by_eps2_like_hf_and_torch():
    """scale_parameter: s_t = max(eps2, RMS(W)), so a zero-initialised matrix (LoRA's B) still moves, by
    eps2 rho_t per step at first, as in HF and torch. The steps are ~1e-5: atol well below them."""
    start = [torch.zeros(12, 20), torch.zeros(8)]
    ours = _run(lambda g: Adafactor(g, lr=1e-2, **HF_LIKE), _plain, start=start)
    hf = _run(lambda g: HFAdafactor(g, lr=None), _plain, start=start)
    pt = _run(
        lambda g: torch.optim.Adafactor(g, lr=1e-2, eps=(1e-30, 1e-3), d=1.0, beta2_decay=-0.8), _plain, start=start
    )
    assert all(bool(w.abs().max() > 1e-6) for w in hf[0])  # the reference moved them on step 1
    _assert_close(ours, hf, atol=1e-9)
    _assert_close(ours, pt, atol=1e-9)


def _run_late(make_opt, set_step):
    """_run's steps 1-2, then `set_step` moves every parameter's step count to 40000, then 3 more steps."""
    params = [torch.nn.Parameter(p) for p in _params()]
    opt = make_opt(_plain(params))
    gen = torch.Generator().manual_seed(1)
    traj = []
    for step in range(5):
        if step == 2:
            for st in opt.state.values():
                set_step(st)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        traj.append([p.detach().clone() for p in params])
    return traj


def _set_step(st: dict) -> None:
    st["step"] = 40000


def test_adafactor_late_in_training_matches_hf_and_torch():
    """Past t = 10^4 the relative step min(1e-2, 1/sqrt(t)) is 1/sqrt(t), below 1e-2 (and beta2_t = 1 - t^-0.8 nears
    1): steps 40001-40003, which the 7-step tests never reach, from the same state in the three optimizers."""
    ours = _run_late(lambda g: Adafactor(g, lr=1e-2, **HF_LIKE), _set_step)
    hf = _run_late(lambda g: HFAdafactor(g, lr=None), _set_step)
    pt = _run_late(
        lambda g: torch.optim.Adafactor(g, lr=1e-2, eps=(1e-30, 1e-3), d=1.0, beta2_decay=-0.8),
        lambda st: st["step"].fill_(40000),
    )
    _assert_close(ours, hf)
    _assert_close(ours, pt)


@pytest.mark.parametrize("beta1", [None, 0.9])
def test_adafactor_hf_momentum_and_weight_decay(beta1):
    kw: dict[str, Any] = dict(HF_LIKE, beta1=beta1, scale_parameter=False, relative_step=False, clip_threshold=1.0)
    ours = _run(lambda g: Adafactor(g, lr=3e-2, weight_decay=0.1, **kw), _plain)
    hf = _run(
        lambda g: HFAdafactor(g, lr=3e-2, beta1=beta1, weight_decay=0.1, scale_parameter=False, relative_step=False),
        _plain,
    )
    _assert_close(ours, hf)


def _galore_groups(params, **low):
    """2-D params low-rank, the 1-D one plain: the usual galore_torch setup."""
    return [{"params": [p for p in params if p.dim() == 2], **low}, {"params": [p for p in params if p.dim() < 2]}]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_galore_adamw_matches_galore_torch(proj_type):
    from galore_torch import GaLoreAdamW as RefAdamW

    low = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type=proj_type)  # refreshes at steps 1, 4, 7
    # `full`: at a refresh P^T G Q^T = diag(s) up to fp32 rounding (~1e-6 off the diagonal) and Adam
    # with eps=1e-8 normalises that rounding noise to O(1) updates, in the reference too: which
    # noise each implementation gets depends on BLAS memory layouts. eps=1e-3 mutes it here.
    kw: dict[str, Any] = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3 if proj_type == "full" else 1e-8, weight_decay=0.01)
    ours = _run(lambda g: GaLoreAdamW(g, **kw), lambda ps: _galore_groups(ps, **low))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _run(lambda g: RefAdamW(g, no_deprecation_warning=True, **kw), lambda ps: _galore_groups(ps, **low))
    _assert_close(ours, ref)


@pytest.mark.parametrize("beta1,scale_parameter", [(None, False), (0.9, False), (0.9, True)])
def test_galore_adafactor_matches_galore_torch(beta1, scale_parameter):
    from galore_torch import GaLoreAdafactor as RefAdafactor

    low = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type="std")
    ours = _run(
        lambda g: GaLoreAdafactor(
            g,
            lr=1e-2,
            beta1=beta1,
            beta2_decay=-0.8,
            eps=0.0,
            eps1=1e-30,
            eps2=1e-3,
            clip_threshold=1.0,
            scale_parameter=scale_parameter,
            relative_step=False,
            weight_decay=0.01,
        ),
        lambda ps: _galore_groups(ps, **low),
    )
    ref = _run(
        lambda g: RefAdafactor(
            g,
            lr=1e-2,
            beta1=beta1,
            decay_rate=-0.8,
            clip_threshold=1.0,
            scale_parameter=scale_parameter,
            relative_step=False,
            weight_decay=0.01,
        ),
        lambda ps: _galore_groups(ps, **low),
    )
    _assert_close(ours, ref)


def _refresh_step_after_a_reset(
    opt: torch.optim.Optimizer, w: torch.nn.Parameter, gen: torch.Generator, fresh_step: Callable[[Any], None]
) -> None:
    """Steps 1..gap, then the refresh (state step == gap) on a gradient G: with moments reset, W moves by
    scale x (a fresh optimizer's first step on an r-column zero tensor with gradient R = G Q^T) Q, where Q is the
    exact SVD's top-r right vectors (std, m >= n: the right basis)."""
    group = opt.param_groups[0]
    for _ in range(group["update_proj_gap"]):
        w.grad = torch.randn(w.shape, generator=gen)
        opt.step()
    g = torch.randn(w.shape, generator=gen)
    before = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    q = torch.linalg.svd(g, full_matrices=False).Vh[: group["rank"]]
    x = torch.nn.Parameter(torch.zeros(w.shape[0], group["rank"]))
    x.grad = g @ q.T
    fresh_step(x)
    torch.testing.assert_close(w.detach(), before + group["scale"] * (x.detach() @ q), atol=1e-6, rtol=1e-5)


def test_galore_adafactor_reset_restarts_its_step_like_a_fresh_hf_adafactor() -> None:
    """moments_on_proj_change='reset' for GaLoreAdafactor: the refresh step is a *first* Adafactor step on
    R = G Q^T (beta2_t = 1 - 1^-0.8 = 0: the statistics are R^2 alone), back-projected and scaled. Reference:
    transformers' Adafactor's first step on a fresh r-column tensor with gradient R (clip_threshold high enough
    never to clip, so the step's size shows)."""
    lr, scale, rank, gap = 1e-2, 0.25, 4, 2
    gen = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(20, 12, generator=gen))
    low = {"rank": rank, "update_proj_gap": gap, "scale": scale, "moments_on_proj_change": "reset"}
    opt = GaLoreAdafactor(
        [{"params": [w], **low}],
        lr=lr,
        beta1=None,
        beta2_decay=-0.8,
        eps=0.0,
        eps1=1e-30,
        eps2=1e-3,
        clip_threshold=1e6,
        scale_parameter=False,
        relative_step=False,
        weight_decay=0.0,
    )
    _refresh_step_after_a_reset(
        opt,
        w,
        gen,
        lambda x: HFAdafactor(
            [x],
            lr=lr,
            eps=(1e-30, 1e-3),
            clip_threshold=1e6,
            decay_rate=-0.8,
            beta1=None,
            weight_decay=0.0,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        ).step(),
    )


def test_galore_adamw_decays_after_the_update_like_galore_torch():
    """galore_torch applies W <- W - lr_t scale back(N), then W <- W - lr wd W (decay of the *updated*
    weights). lr * wd = 0.1 makes the order visible (the default test's 1e-4 hides it under the tolerance);
    the gradients do not depend on W, so both runs get the same SVD bases however far W moves."""
    from galore_torch import GaLoreAdamW as RefAdamW

    low = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type="std")
    kw: dict[str, Any] = dict(lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=1.0)
    ours = _run(lambda g: GaLoreAdamW(g, **kw), lambda ps: _galore_groups(ps, **low))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _run(lambda g: RefAdamW(g, no_deprecation_warning=True, **kw), lambda ps: _galore_groups(ps, **low))
    _assert_close(ours, ref)


def test_galore_adamw_reset_restarts_bias_correction_like_a_fresh_torch_adamw():
    """moments_on_proj_change='reset': at a refresh the moments are zeroed and bias correction restarts,
    so the refresh step is a *first* Adam step on R = G Q^T, back-projected and scaled. Reference:
    torch.optim.AdamW's first step on a fresh r-column tensor with gradient R, R from the exact SVD of
    G (Q's sign is irrelevant: Adam's first step is odd in R and back-projection multiplies by Q again)."""
    torch.manual_seed(0)
    lr, scale, rank, gap = 1e-2, 0.25, 4, 2
    w = torch.nn.Parameter(torch.randn(20, 12))
    opt = GaLoreAdamW(
        [{"params": [w], "rank": rank, "update_proj_gap": gap, "scale": scale, "moments_on_proj_change": "reset"}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.0,
    )
    gen = torch.Generator().manual_seed(1)
    _refresh_step_after_a_reset(
        opt, w, gen, lambda x: torch.optim.AdamW([x], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0).step()
    )
