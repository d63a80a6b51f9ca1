"""AdaLomo: parity with HF Adafactor and lomo_optim, state/resume, ablation variants."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from model import Transformer
from optim import OptimConfig, optimizer_spec
from optim import factorization as fac
from optim.adalomo import AdaLomo
from tests.helpers.tiny_lm import batch, loss_of, tiny_model

torch.set_num_threads(1)


def test_one_step_matches_hf_adafactor():
    from transformers.optimization import Adafactor  # reference package (test extra)

    torch.manual_seed(0)
    params = [torch.randn(24, 40) * 0.02, torch.randn(40) * 0.5 + 1, torch.randn(7, 3) * 1e-5]
    ours = [torch.nn.Parameter(p.clone()) for p in params]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = AdaLomo(ours, lr=1e-3, weight_decay=0.1)
    hf = Adafactor(
        ref,
        lr=1e-3,
        eps=(1e-30, 1e-3),
        clip_threshold=1.0,
        decay_rate=-0.8,
        beta1=None,
        weight_decay=0.1,
        scale_parameter=True,
        relative_step=False,
        warmup_init=False,
    )
    for step in range(4):
        for a, b in zip(ours, ref, strict=True):
            g = torch.randn(a.shape) * (10.0 if step == 2 else 0.01)  # step 2 exercises the clipping
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        hf.step()
        for a, b, p0 in zip(ours, ref, params, strict=True):
            torch.testing.assert_close(a.data, b.data, rtol=1e-6, atol=1e-9)
            assert not torch.equal(a.data, p0)  # it did move
    # State lives in optimizer.state under HF's names.
    st = opt.state[ours[0]]
    assert st["step"] == 4 and st["exp_avg_sq_row"].shape == (24,) and st["exp_avg_sq_col"].shape == (40,)
    torch.testing.assert_close(st["exp_avg_sq_row"], hf.state[ref[0]]["exp_avg_sq_row"], rtol=1e-6, atol=0)


def test_matches_lomo_optim_reference(monkeypatch):
    """lomo_optim.AdaLomo is CUDA-only (it calls .cuda() on its state); on CPU we make .cuda() a
    no-op and run its fused backward against our ordinary step on the same model."""
    import lomo_optim as lomo  # reference package (test extra)

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    m_ref, m_ours = tiny_model(), tiny_model()
    ref = lomo.AdaLomo(m_ref, lr=1e-3, loss_scale=None, weight_decay=0.01)
    params = [p for _, p in m_ours.named_parameters()]
    ours = AdaLomo(params, lr=1e-3, weight_decay=0.01)
    for step in range(3):
        ref.fused_backward(loss_of(m_ref, batch(step)), 1e-3)
        loss_of(m_ours, batch(step)).backward()
        ours.step()
        ours.zero_grad()
    for (n, a), b in zip(m_ref.named_parameters(), m_ours.parameters(), strict=True):
        torch.testing.assert_close(a.data, b.data, rtol=1e-5, atol=1e-8, msg=n)


def test_builder_reads_config():
    model = tiny_model()
    spec = optimizer_spec(model, OptimConfig(name="adalomo", weight_decay=0.1))
    assert spec.cls is AdaLomo
    assert spec.kwargs["clip_threshold"] == 1.0 and spec.kwargs["decay_rate"] == -0.8
    wds = {g["weight_decay"]: g["names"] for g in spec.param_groups}
    assert set(wds) == {0.1, 0.0} and all(n.endswith("norm.weight") for n in wds[0.0])
    bogus: dict[str, Any] = dict(update_norm="bogus")  # past the annotation, as from a file
    with pytest.raises(ValueError, match="update_norm"):
        optimizer_spec(model, OptimConfig(name="adalomo", **bogus)).build()


def _reference_first_step(model: Transformer, update_norm: str, lr: float, wd_of) -> dict[str, torch.Tensor]:
    """From-scratch step 1 (beta2_1 = 0: the second moment is g^2 + eps1 itself), in fp64."""
    us = {}
    for name, p in model.named_parameters():
        assert p.grad is not None
        g = p.grad.double()
        u = g * g + 1e-30
        if g.dim() == 2:
            r, c = u.mean(1), u.mean(0)
            us[name] = g / torch.sqrt(torch.outer(r / r.mean(), c))
        else:
            us[name] = g / torch.sqrt(u)
    groups: dict[str, list[str]] = {}
    for name in us:
        key = {
            "grouped": name,
            "none": name,
            "global": "all",
            "layerwise": ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name,
        }[update_norm]
        groups.setdefault(key, []).append(name)
    new = {}
    params = dict(model.named_parameters())
    for names in groups.values():
        sq = sum(float(us[n].square().sum()) for n in names)
        rms = math.sqrt(sq / sum(us[n].numel() for n in names))
        div = 1.0 if update_norm == "none" else max(1.0, rms)
        for n in names:
            theta = params[n].detach().double()
            eta = lr * max(1e-3, float(theta.norm() / math.sqrt(theta.numel())))
            new[n] = theta * (1 - eta * wd_of(n)) - eta * us[n] / div
    return new


@pytest.mark.parametrize("update_norm", ["grouped", "none", "layerwise", "global"])
def test_update_norm_variants_first_step(update_norm):
    model = tiny_model()
    spec = optimizer_spec(model, OptimConfig(name="adalomo", lr=1e-2, weight_decay=0.1, update_norm=update_norm))
    opt = spec.build()
    loss_of(model, batch(0)).mul(50.0).backward()  # large gradients: the normalisation is active
    expected = _reference_first_step(model, update_norm, 1e-2, lambda n: 0.0 if n.endswith("norm.weight") else 0.1)
    opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.data.double(), expected[name], rtol=1e-5, atol=1e-7, msg=name)


VARIANTS = [("nmf", 1), ("nmf", 2), ("nmf", 4), ("svd", 1), ("svd", 2), ("svd", 4), ("qr", 1), ("qr", 2), ("qr", 4)]


@pytest.mark.parametrize("method,rank", VARIANTS)
def test_factorization_state_is_small_and_resume_exact(method, rank):
    cfg = OptimConfig(name="adalomo", factorization=method, factor_rank=rank)
    model = tiny_model()
    opt = optimizer_spec(model, cfg).build()

    def train(model, opt, steps):
        for s in steps:
            loss_of(model, batch(s)).backward()
            opt.step()
            opt.zero_grad()

    train(model, opt, range(2))
    for p in model.parameters():
        st = opt.state[p]
        n_state = sum(v.numel() for v in st.values() if torch.is_tensor(v))
        assert n_state * 4 == fac.factored_state_bytes(tuple(p.shape), method, rank)
        if p.dim() == 2:
            assert n_state <= (sum(p.shape)) * (rank + 1)  # O((m + n) r), never m x n
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, range(2, 4))
    # Resume from the step-2 snapshot in a fresh model / optimizer: bitwise the same.
    model2 = tiny_model(seed=5)
    model2.load_state_dict(saved_model)
    opt2 = optimizer_spec(model2, cfg).build()
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, range(2, 4))
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()


def test_rank1_nmf_is_kl_fixed_point():
    """The closed form (rows x cols / total) is what KL multiplicative updates converge to at r = 1."""
    torch.manual_seed(0)
    a = torch.rand(20, 30) ** 3 + 1e-3
    w, h = torch.rand(20, 1) + 0.1, torch.rand(1, 30) + 0.1
    w, h = fac.nmf_kl(a, w, h, 200)
    closed = torch.outer(a.sum(1), a.sum(0)) / a.sum()
    torch.testing.assert_close(w @ h, closed, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["nmf", "svd", "qr"])
def test_rank_r_recovers_exact_rank_r_matrix(method):
    torch.manual_seed(0)
    a = (torch.rand(30, 2) + 0.1) @ (torch.rand(2, 25) + 0.1)  # positive, rank 2
    state: dict = {}
    fac.init_state(state, a.shape, method, 2, "cpu")
    fac.update(state, a, 0.0, True, method, 2, 200 if method == "nmf" else 2)
    torch.testing.assert_close(fac.approx(state), a, rtol=1e-3 if method == "nmf" else 1e-4, atol=1e-5)
    # Higher rank fits a generic positive matrix at least as well as rank 1 (KL / Frobenius).
    b = torch.rand(30, 25) + 0.05
    errs = []
    for r in (1, 4):
        st: dict = {}
        fac.init_state(st, b.shape, method, r, "cpu")
        fac.update(st, b, 0.0, True, method, r, 50)
        errs.append(float((fac.approx(st) - b).norm()))
        if method == "nmf" and r == 1:  # nmf-1 is Adafactor's closed form r c^T / mean(r)
            torch.testing.assert_close(fac.approx(st), torch.outer(b.mean(1) / b.mean(1).mean(), b.mean(0)))
    assert errs[1] < errs[0]


def test_bf16_parameters_written_back_in_dtype():
    p = torch.nn.Parameter((torch.randn(16, 8) * 0.02).bfloat16())
    opt = AdaLomo([p], lr=1e-2)
    p.grad = torch.randn(16, 8).bfloat16()
    before = p.detach().clone()
    opt.step()
    assert p.dtype == torch.bfloat16 and not torch.equal(p, before)
    assert opt.state[p]["exp_avg_sq_row"].dtype == torch.float32


def test_ablation_configs_load():
    from pathlib import Path

    import trainer.config as config_mod

    files = sorted((Path(__file__).parents[2] / "configs" / "ablations").glob("adalomo_*.yaml"))
    seen = set()
    for f in files:
        cfg = config_mod.load_config(str(f), [])
        o = cfg.optim
        assert o.name == "adalomo" and cfg.train.fused_update and cfg.train.max_grad_norm == 0
        seen.add((o.update_norm, o.factorization, o.factor_rank))
        AdaLomo(
            [torch.nn.Parameter(torch.zeros(2, 2))],
            update_norm=o.update_norm,
            factorization=o.factorization,
            factor_rank=o.factor_rank,
        )
    assert {("grouped", "nmf", 1), ("none", "nmf", 1), ("layerwise", "nmf", 1), ("global", "nmf", 1)} <= seen
    assert {(f, r) for _, f, r in seen} >= {(f, r) for f in ("nmf", "svd", "qr") for r in (1, 2, 4)}


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(factor_rank=0), r"optim\.factor_rank and optim\.factor_iters must be >= 1, got 0, 1"),
        (dict(factor_iters=0), r"optim\.factor_rank and optim\.factor_iters must be >= 1, got 1, 0"),
        (dict(clip_threshold=0.0), r"AdaLomo needs clip_threshold > 0 \(use update_norm=none to disable\), got 0\.0"),
        (dict(decay_rate=0.0), r"AdaLomo needs decay_rate < 0 \(beta2_t = 1 - t\^decay_rate\), got 0\.0"),
    ],
)
def test_constructor_refuses_the_first_value_out_of_range(kw: dict[str, Any], match: str) -> None:
    """The edges themselves (0) are refused: rank 0 has no factor, clip 0 divides by zero, decay 0 freezes
    beta2_t at 0."""
    with pytest.raises(ValueError, match=match):
        AdaLomo([torch.nn.Parameter(torch.zeros(2, 2))], **kw)


def test_beta2_decay_zero_is_refused_by_the_builder_check_naming_the_key() -> None:
    match = r"optim\.beta2_decay=0\.0: AdaLomo needs beta2_decay < 0 .* or null \(= -0\.8\)"
    with pytest.raises(ValueError, match=match):
        optimizer_spec(tiny_model(), OptimConfig(name="adalomo", beta2_decay=0.0))


def test_a_zero_vector_moves_by_lr_times_eps2() -> None:
    """RMS(theta) = 0 is floored at eps2, so a zero-initialised vector (a bias) still moves: step 1 has
    V = g^2 + eps1, U = sign(g), RMS(U) = 1 (no clipping), eta = lr eps2, theta_1 = -lr eps2 sign(g)."""
    p = torch.nn.Parameter(torch.zeros(6))
    opt = AdaLomo([p], lr=1e-2)
    g = torch.tensor([1.0, -2.0, 0.5, -0.25, 3.0, -4.0])
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), -1e-2 * 1e-3 * torch.sign(g), rtol=1e-6, atol=0)


@pytest.mark.parametrize("update_norm", ["layerwise", "global"])
def test_coupled_normalisation_uses_the_configured_clip_threshold(update_norm: str) -> None:
    """Step 1 on two vectors of ones: U = sign(g), the group's RMS(U) = 1, divisor max(1, 1 / 0.5) = 2,
    eta = lr RMS(theta) = lr: theta_1 = 1 - lr sign(g) / 2."""
    ps = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))]
    names = ["blocks.0.attn_norm.weight", "blocks.0.mlp_norm.weight"]
    opt = AdaLomo([{"params": ps, "names": names}], lr=1e-2, clip_threshold=0.5, update_norm=update_norm)
    grads = [torch.tensor([1.0, -2.0, 3.0, -4.0]), torch.tensor([-0.5, 0.5, 2.0])]
    for p, g in zip(ps, grads, strict=True):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(ps, grads, strict=True):
        torch.testing.assert_close(p.detach(), 1.0 - 1e-2 * torch.sign(g) / 2, rtol=1e-6, atol=0)


def test_layerwise_groups_blocks_past_nine_by_their_full_index() -> None:
    names = ["blocks.12.attn.wq.weight", "blocks.12.mlp.up.weight", "blocks.1.attn.wq.weight", "lm_head.weight"]
    ps = [torch.nn.Parameter(torch.zeros(2, 2)) for _ in names]
    opt = AdaLomo([{"params": ps, "names": names}], update_norm="layerwise")
    assert [opt.norm_group_key(p) for p in ps] == ["blocks.12", "blocks.12", "blocks.1", "lm_head.weight"]
