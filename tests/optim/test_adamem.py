"""AdaMeM properties: Claim 3.1 orthogonality, full-rank residual, span(P), refresh schedule, memory."""

from __future__ import annotations

import copy

import pytest
import torch

from optim import AdaMeM
from optim.state_bytes import measured_state_bytes

SHAPES = [(12, 30), (30, 12)]


def _grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # a decaying spectrum, like real gradients, so the top-r subspace is meaningful
    return [torch.randn(shape, generator=gen) @ torch.diag(torch.linspace(3, 0.1, shape[1])) for _ in range(steps)]


def _make(shape, **kw):
    p = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(7)))
    opts = dict(lr=1e-2, rank=4, update_proj_gap=3, weight_decay=0.0)
    opts.update(kw)
    return p, AdaMeM([p], **opts)


def _update(p, opt, g):
    """One step; returns the update W_before - W_after."""
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    return before - p.detach()


def _split_updates(shape, variant, steps=5):
    """Per step: (low-rank part lr P N1, residual part lr N2), from twin optimizers with delta 0 and 1
    fed the same gradients (state does not depend on the weights or on delta)."""
    p0, o0 = _make(shape, delta=0.0, variant=variant)
    p1, o1 = _make(shape, delta=1.0, variant=variant)
    out = []
    for g in _grads(shape, steps):
        u0, u1 = _update(p0, o0, g), _update(p1, o1, g)
        out.append((u0, u1 - u0))
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_claim_3_1_lowrank_and_residual_updates_orthogonal(shape):
    for low, res in _split_updates(shape, "adamem"):
        assert low.norm() > 0 and res.norm() > 0
        cos = (low * res).sum() / (low.norm() * res.norm())
        assert abs(cos) < 1e-5, cos


@pytest.mark.parametrize("shape", SHAPES)
def test_variant2_breaks_orthogonality(shape):
    """Two-sided Adafactor on the residual mixes rows: the test above has power."""
    cos = [abs((lo * re).sum() / (lo.norm() * re.norm())) for lo, re in _split_updates(shape, "variant2")]
    assert max(cos) > 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_full_rank_residual_is_zero(shape):
    rank = min(shape)
    g = _grads(shape, 1)[0]
    p, opt = _make(shape, rank=rank)
    _update(p, opt, g)
    P = opt.state[p]["proj_left"]
    gg = g if shape[0] <= shape[1] else g.T
    assert (gg - P @ (P.T @ gg)).norm() / gg.norm() < 1e-5
    # and the residual contributes nothing: delta has no effect
    ((low, res),) = _split_updates_rank(shape, rank)
    assert res.abs().max() == 0


def _split_updates_rank(shape, rank):
    p0, o0 = _make(shape, delta=0.0, rank=rank)
    p1, o1 = _make(shape, delta=1.0, rank=rank)
    g = _grads(shape, 1)[0]
    u0, u1 = _update(p0, o0, g), _update(p1, o1, g)
    return [(u0, u1 - u0)]


@pytest.mark.parametrize("shape", SHAPES)
def test_delta0_beta1_0_update_in_span_of_P(shape):
    p, opt = _make(shape, delta=0.0, beta1=0.0)
    for g in _grads(shape, 4):
        u = _update(p, opt, g)
        P = opt.state[p]["proj_left"]
        uu = u if shape[0] <= shape[1] else u.T
        assert (uu - P @ (P.T @ uu)).norm() / uu.norm() < 1e-5


def test_projector_refreshes_exactly_every_T():
    shape, T = (12, 30), 3
    p, opt = _make(shape, update_proj_gap=T)
    changed, prev = [], None
    grads = _grads(shape, 10)
    for g in grads:
        _update(p, opt, g)
        P = opt.state[p]["proj_left"].clone()
        changed.append(prev is None or not torch.equal(P, prev))
        if changed[-1]:  # a fresh P is the top-r left singular vectors of this step's gradient
            U = torch.linalg.svd(g, full_matrices=False).U[:, :4]
            assert torch.allclose((U @ U.T), P @ P.T, atol=1e-5)
        prev = P
    assert [i + 1 for i, c in enumerate(changed) if c] == [1, 4, 7, 10]
    assert opt.state[p]["proj_updates"] == 4 and opt.proj_updates == 4 and opt.svd_failures == 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["adamem", "variant1", "variant2"])
def test_state_memory_matches_formula(shape, variant):
    m, n = shape
    small, large, r = min(m, n), max(m, n), 4
    p, opt = _make(shape, variant=variant)
    _update(p, opt, _grads(shape, 1)[0])
    expected = {
        "adamem": (m + n) * r + r + 2 * large,
        "variant2": (m + n) * r + r + 2 * large + small,
        "variant1": (m + n) * r + m + n,
    }[variant]
    assert measured_state_bytes(opt) == 4 * expected


def test_second_moment_source_switch_matters():
    shape = (12, 30)
    # identical on step 1 (M_hat = R), so compare after a few steps
    pa, oa = _make(shape, second_moment_from="momentum")
    pb, ob = _make(shape, second_moment_from="gradient")
    for g in _grads(shape, 3):
        ua, ub = _update(pa, oa, g), _update(pb, ob, g)
    assert not torch.allclose(ua, ub)


@pytest.mark.parametrize("policy", ["reset", "rotate"])
def test_moment_policies_on_projector_change(policy):
    shape = (12, 30)
    p, opt = _make(shape, update_proj_gap=2, moments_on_proj_change=policy)
    grads = _grads(shape, 3)
    _update(p, opt, grads[0])
    _update(p, opt, grads[1])
    state = opt.state[p]
    old_P, old_M = state["proj_left"].clone(), state["exp_avg"].clone()
    ref = copy.deepcopy(state)
    _update(p, opt, grads[2])  # refresh at step 3
    new_P = state["proj_left"]
    b1 = 0.9
    if policy == "reset":
        assert state["moment_step"] == 1
        expected = (1 - b1) * (new_P.T @ grads[2])
    else:
        expected = b1 * (new_P.T @ old_P @ old_M) + (1 - b1) * (new_P.T @ grads[2])
    torch.testing.assert_close(state["exp_avg"], expected, atol=1e-6, rtol=1e-5)
    assert ref["proj_updates"] + 1 == state["proj_updates"]


def test_svd_failure_keeps_previous_projector_and_counts():
    shape = (12, 30)
    p, opt = _make(shape, update_proj_gap=1)
    _update(p, opt, _grads(shape, 1)[0])
    P = opt.state[p]["proj_left"].clone()
    bad = torch.full(shape, float("nan"))
    with pytest.warns(UserWarning, match="SVD failed"):
        p.grad = bad
        opt.step()
    assert torch.equal(opt.state[p]["proj_left"], P)
    assert opt.svd_failures == 1


def test_randomized_svd_close_to_exact():
    shape = (12, 30)
    pe, oe = _make(shape, svd_method="exact")
    pr, orr = _make(shape, svd_method="randomized")
    g = _grads(shape, 1)[0]
    _update(pe, oe, g), _update(pr, orr, g)
    Pe, Pr = oe.state[pe]["proj_left"], orr.state[pr]["proj_left"]
    torch.testing.assert_close(Pe @ Pe.T, Pr @ Pr.T, atol=1e-4, rtol=1e-4)


def test_a_random_fallback_basis_has_the_rank_an_svd_basis_would_have(monkeypatch):
    """The first refresh's SVD fails twice (on G and its jittered copy): the seeded random basis takes its place with
    min(rank, m, n) vectors, so the next refresh's SVD basis fits the moments built on it."""
    from optim import projector
    from optim.galore import GaLoreAdamW

    p = torch.nn.Parameter(torch.randn(16, 4))
    opt = GaLoreAdamW([{"params": [p], "rank": 8, "update_proj_gap": 2, "proj_type": "left"}], lr=1e-2)
    real_svd, calls = projector._svd, []

    def failing_first_refresh(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise torch.linalg.LinAlgError("forced")
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(projector, "_svd", failing_first_refresh)
    g = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match="using a random basis"):
        for _ in range(4):  # refreshes at steps 0 (random) and 2 (SVD)
            p.grad = torch.randn(16, 4, generator=g)
            opt.step()
    assert len(calls) == 3 and opt.svd_failures == 1
    assert opt.state[p]["proj_left"].shape == (16, 4) and opt.state[p]["exp_avg"].shape == (4, 4)
    assert bool(p.isfinite().all())
