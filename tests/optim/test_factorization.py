"""AdaLomo's factored second-moment estimates (optim/factorization.py): the relative floor keeps every
arm's update close to nmf-1's on structured gradients, the floor's exact form, and its logging."""

from __future__ import annotations

import pytest
import torch

from optim import OptimConfig, optimizer_spec
from optim import factorization as fac
from optim.adalomo import AdaLomo
from tests.helpers.tiny_lm import batch, loss_of, tiny_model
from trainer.update import build_update_strategy

torch.set_num_threads(1)

ARMS = [("nmf", 1), ("nmf", 2), ("nmf", 4), ("svd", 1), ("svd", 2), ("svd", 4), ("qr", 1), ("qr", 2), ("qr", 4)]
M, N, STEPS = 128, 512, 40
LR = 1e-3  # with theta = 0 and eps2 = 1e-3: eta = lr * eps2 for all 40 steps (RMS(theta) stays < eps2)


def structured_grads(sparse_rows: bool) -> list[torch.Tensor]:
    """g = outer(row scales, column scales) * N(0, 1): log-normal scales (sigma 1, about 3 decades
    from smallest to largest each way), as the rows / columns of real weight gradients have. With
    `sparse_rows`, 70% of the rows are zero in each step (an embedding's absent tokens)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.exp(torch.randn(M, generator=gen))
    cols = torch.exp(torch.randn(N, generator=gen))
    grads = []
    for _ in range(STEPS):
        g = torch.outer(rows, cols) * torch.randn(M, N, generator=gen) * 1e-3
        if sparse_rows:
            g *= (torch.rand(M, 1, generator=gen) < 0.3).float()
        grads.append(g)
    return grads


def normalised_updates(method: str, rank: int, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """U / max(1, RMS(U)) of each step, read off AdaLomo's parameter change (eta is the constant
    lr * eps2 here, weight decay 0)."""
    p = torch.nn.Parameter(torch.zeros(M, N))
    opt = AdaLomo([p], lr=LR, factorization=method, factor_rank=rank)
    eta = LR * 1e-3
    out = []
    for g in grads:
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        out.append((before - p.detach()) / eta)
    return out


@pytest.mark.parametrize("sparse_rows", [False, True], ids=["dense", "sparse_rows"])
def test_every_arm_keeps_its_entries_moving_and_its_update_bounded(sparse_rows):
    """The regression test of the absolute eps1 floor: svd2/svd4/qr2/qr4 put the whole update on a
    few entries (max |U| -> sqrt(mn) = 256, about nothing else moving), and nmf2/nmf4 turned NaN
    on the sparse rows. Now every arm moves >= 90% of the entries with a gradient at every step
    and its largest update stays within 4 x nmf-1's."""
    grads = structured_grads(sparse_rows)
    reference_max = max(float(u.abs().max()) for u in normalised_updates("nmf", 1, grads))
    for method, rank in ARMS:
        worst_max, worst_moving = 0.0, 1.0
        for g, u in zip(grads, normalised_updates(method, rank, grads), strict=True):
            assert torch.isfinite(u).all(), f"{method}{rank}: non-finite update"
            live = u[g != 0]
            rms = live.square().mean().sqrt()
            worst_moving = min(worst_moving, float((live.abs() > 1e-2 * rms).float().mean()))
            worst_max = max(worst_max, float(u.abs().max()))
        assert worst_moving >= 0.9, f"{method}{rank}: only {worst_moving:.1%} of the entries move in some step"
        assert worst_max <= 4 * reference_max, f"{method}{rank}: max |U| {worst_max:.3g} vs nmf-1's {reference_max:.3g}"


@pytest.mark.parametrize("method,rank", [("svd", 2), ("qr", 4), ("nmf", 2)])
def test_estimate_is_the_factors_floored_at_a_fraction_of_the_rank1_estimate(method, rank):
    grads = structured_grads(sparse_rows=False)
    state: dict = {}
    fac.init_state(state, (M, N), method, rank, "cpu")
    for t, g in enumerate(grads[:5], 1):
        fac.update(state, g.square().add(1e-30), 1.0 - t**-0.8, t == 1, method, rank, 1)
    row, col = state["exp_avg_sq_row"].double(), state["exp_avg_sq_col"].double()
    rank1 = torch.outer(row / row.mean(), col)  # Adafactor's estimate from the same state, fp64
    factors = (state["factor_left"] @ state["factor_right"]).double()
    v, floored = fac.estimate(state, count=True)
    torch.testing.assert_close(v.double(), torch.maximum(factors, fac.FLOOR_RATIO * rank1), rtol=1e-6, atol=0)
    assert floored is not None and int(floored) == int((factors < fac.FLOOR_RATIO * rank1).sum())
    # Hence |U| <= |U_adafactor| / sqrt(FLOOR_RATIO) elementwise.
    u, _ = fac.divide_by_sqrt_approx(state, grads[4])
    bound = grads[4].double().abs() / (fac.FLOOR_RATIO * rank1).sqrt()
    assert bool((u.double().abs() <= bound * (1 + 1e-5)).all())


def test_rank1_statistics_are_adafactors():
    """The reference every factored variant keeps is exactly nmf-1's state (same ops, same bits)."""
    grads = structured_grads(sparse_rows=False)[:4]
    closed: dict = {}
    factored: dict = {}
    fac.init_state(closed, (M, N), "nmf", 1, "cpu")
    fac.init_state(factored, (M, N), "svd", 2, "cpu")
    for t, g in enumerate(grads, 1):
        for st, (method, rank) in ((closed, ("nmf", 1)), (factored, ("svd", 2))):
            fac.update(st, g.square().add(1e-30), 1.0 - t**-0.8, t == 1, method, rank, 1)
    assert torch.equal(closed["exp_avg_sq_row"], factored["exp_avg_sq_row"])
    assert torch.equal(closed["exp_avg_sq_col"], factored["exp_avg_sq_col"])


def test_floored_fraction_is_logged_the_same_on_both_paths():
    """optim/floored_frac: floored entries / entries of the factored matrices in the last step, the
    same whether one optimizer holds every parameter or the fused path holds one per parameter."""
    counters, updaters = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        model = tiny_model()
        spec = optimizer_spec(model, OptimConfig(name="adalomo", lr=1e-2, factorization="svd", factor_rank=2))
        updater = build_update_strategy(spec, list(model.parameters()), fused=fused, max_grad_norm=0.0)
        assert "optim/floored_frac" not in updater.counters()  # nothing factored yet
        for step in range(2):
            updater.before_backward(True)
            loss_of(model, batch(seed=step)).backward()
            updater.finish_backward()
            updater.commit()
        counters.append(updater.counters())
        updaters.append(updater)
    assert counters[0] == counters[1]
    # Independently: recount over the plain optimizer's final state (the state the last step divided by).
    (plain_opt,) = updaters[0].optimizers()
    factored = [st for st in plain_opt.state.values() if "factor_left" in st]
    assert factored
    counts = [fac.estimate(st, count=True)[1] for st in factored]
    floored = sum(int(c) for c in counts if c is not None)
    assert len(counts) == len(factored) and all(c is not None for c in counts)
    entries = sum(st["factor_left"].shape[0] * st["factor_right"].shape[1] for st in factored)
    assert counters[0]["optim/floored_frac"] == pytest.approx(floored / entries, rel=1e-6)
    assert 0 < floored < entries / 2  # the floor is active on the tiny model's matrices, on a minority of entries


def test_floored_fraction_of_the_optimizer_counts_factored_matrices_only():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.zeros(M, N)), torch.nn.Parameter(torch.zeros(N))
    opt = AdaLomo([w, b], lr=LR, factorization="qr", factor_rank=2)
    assert opt.floored_fraction == 0.0
    state: dict = {}
    fac.init_state(state, (M, N), "qr", 2, "cpu")
    for t, g in enumerate(structured_grads(sparse_rows=False)[:3], 1):
        w.grad, b.grad = g.clone(), g[0].clone()
        opt.step()
        fac.update(state, g.square().add(1e-30), 1.0 - t**-0.8, t == 1, "qr", 2, 1)
    _, floored = fac.estimate(state, count=True)
    assert floored is not None and opt.floored_fraction == int(floored) / (M * N)  # the vector is not counted
    nmf1 = AdaLomo([torch.nn.Parameter(torch.zeros(4, 4))])
    nmf1.param_groups[0]["params"][0].grad = torch.ones(4, 4)
    nmf1.step()
    assert nmf1.floored_stats()[1] == 0 and nmf1.floored_fraction == 0.0


def test_state_saved_before_the_floor_is_refused_with_the_reason():
    state: dict = {}
    fac.init_state(state, (4, 6), "svd", 2, "cpu")
    del state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    with pytest.raises(ValueError, match="before the relative floor"):
        fac.update(state, torch.ones(4, 6), 0.5, False, "svd", 2, 1)


@pytest.mark.parametrize("rank", [2, 8], ids=["r2", "r8_capped"])
@pytest.mark.parametrize("method", ["svd", "qr"])
def test_full_rank_factors_are_the_ema_of_u(method: str, rank: int) -> None:
    """At r = min(m, n) (asked for or capped from above) svd and qr fit A_t exactly, so the estimate is the EMA
    V_2 = beta u_1 + (1 - beta) u_2, hand-computed here (the floor, 0.1 x the rank-1 estimate, is not reached)."""
    u1 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]])
    u2 = torch.tensor([[3.0, 1.0, 2.0], [2.0, 7.0, 4.0]])
    state: dict = {}
    fac.init_state(state, (2, 3), method, rank, "cpu")
    assert state["factor_left"].shape == (2, 2) and state["factor_right"].shape == (2, 3)  # rank capped at min(m, n)
    fac.update(state, u1, 0.0, True, method, rank, 1)
    torch.testing.assert_close(fac.approx(state), u1, rtol=1e-5, atol=0)
    fac.update(state, u2, 0.25, False, method, rank, 1)
    expected = torch.tensor([[2.5, 1.25, 2.25], [2.5, 6.5, 4.625]])  # 0.25 u1 + 0.75 u2
    torch.testing.assert_close(fac.approx(state), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "method,rank,factored,state_bytes",
    [("nmf", 1, False, 40), ("svd", 1, True, 80), ("qr", 1, True, 80), ("nmf", 2, True, 120)],
)
def test_only_nmf_rank1_is_the_closed_form(method: str, rank: int, factored: bool, state_bytes: int) -> None:
    """svd-1 and qr-1 are factored arms of their own (a rank-1 SVD / QR floored at 0.1 x Adafactor's), not nmf-1:
    they keep (4 + 6) x (1 + 1) floats, nmf-1 keeps 4 + 6."""
    state: dict = {}
    fac.init_state(state, (4, 6), method, rank, "cpu")
    assert ("factor_left" in state) is factored
    assert fac.factored_state_bytes((4, 6), method, rank) == state_bytes


def test_pivoted_qr_picks_the_largest_residual_column() -> None:
    """Column 1 (norm 10.0005) first; then column 2 (residual norm 5), not column 0 (norm 10 but residual ~0.1:
    almost parallel to column 1)."""
    a = torch.tensor([[10.0, 10.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 5.0]])
    q, piv = fac.pivoted_qr(a, 2)
    assert piv.tolist() == [1, 2]
    norm1 = (10.0**2 + 0.1**2) ** 0.5
    expected = torch.tensor([[10.0 / norm1, 0.0], [0.1 / norm1, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(q, expected, rtol=1e-6, atol=1e-7)


def test_nmf_rows_returning_after_zero_gradients_stay_finite() -> None:
    """Rows with no gradient for three steps (u = eps1: W's rows ~ 1e-37) that return with |g| ~ 1e3: the ratio
    A / W H is read through the floor, so it does not overflow to inf and the factors stay finite. W's columns are
    rescaled to sum 1 after every step (the scale is moved into H)."""
    gen = torch.Generator().manual_seed(0)
    state: dict = {}
    fac.init_state(state, (8, 12), "nmf", 2, "cpu")
    for t in range(1, 6):
        g = torch.randn(8, 12, generator=gen) * 1e3
        if t <= 3:
            g[:2] = 0
        fac.update(state, g.square().add(1e-30), 1.0 - t**-0.8, t == 1, "nmf", 2, 1)
        assert torch.isfinite(state["factor_left"]).all() and torch.isfinite(state["factor_right"]).all(), t
        torch.testing.assert_close(state["factor_left"].sum(0), torch.ones(2))


def test_first_nmf_step_runs_at_least_ten_iterations() -> None:
    """No warm start on the first step: factor_iters = 1 and 10 give the same factors there (10 iterations run
    either way), while on a warm-started step they differ."""
    gen = torch.Generator().manual_seed(0)
    u1, u2 = torch.rand(6, 9, generator=gen) + 0.1, torch.rand(6, 9, generator=gen) + 0.1
    states: list[dict] = [{}, {}]
    for st, iters in zip(states, (1, 10), strict=True):
        fac.init_state(st, (6, 9), "nmf", 2, "cpu")
        fac.update(st, u1, 0.0, True, "nmf", 2, iters)
    assert torch.equal(states[0]["factor_left"], states[1]["factor_left"])
    assert torch.equal(states[0]["factor_right"], states[1]["factor_right"])
    for st, iters in zip(states, (1, 10), strict=True):
        fac.update(st, u2, 0.5, False, "nmf", 2, iters)
    assert not torch.equal(states[0]["factor_right"], states[1]["factor_right"])
