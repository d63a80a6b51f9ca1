"""AdaMeM properties: Claim 3.1 orthogonality, full-rank residual, span(P), refresh schedule, memory."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from optim import Adafactor, AdaMeM, projector
from optim.galore import GaLoreAdamW
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


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(variant="variant3"), r"variant must be one of \('adamem', 'variant1', 'variant2'\), got 'variant3'"),
        (dict(second_moment_from="momentm"), r"second_moment_from must be one of \('momentum', 'gradient'\)"),
        (dict(beta1=1.0), r"beta1 must be in \[0, 1\) or None, got 1.0"),  # 1: a momentum frozen at 0, 0 / 0
    ],
)
def test_an_unknown_choice_is_an_error_naming_the_choices(kw, match):
    with pytest.raises(ValueError, match=match):
        _make((12, 30), **kw)


def test_galore_defaults_to_scale_1_and_refuses_an_unknown_moment_policy_naming_the_choices() -> None:
    p = torch.nn.Parameter(torch.zeros(6, 4))
    assert GaLoreAdamW([{"params": [p], "rank": 2}]).param_groups[0]["scale"] == 1.0  # galore_torch's projector
    opt = GaLoreAdamW([{"params": [p], "rank": 2, "moments_on_proj_change": "rotat"}])
    p.grad = torch.ones(6, 4)
    with pytest.raises(ValueError, match=r"moments_on_proj_change must be one of \('keep', 'reset', 'rotate'\)"):
        opt.step()


def test_galore_adamw_refuses_an_unknown_option_naming_it() -> None:
    """A misspelt low-rank option (`rnak`) is an error, not a silently ignored default."""
    p = torch.nn.Parameter(torch.zeros(6, 4))
    with pytest.raises(TypeError, match=r"^unknown GaLoreAdamW options \['rnak'\]$"):
        GaLoreAdamW([{"params": [p]}], rnak=2)


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


def test_randomized_svd_finds_the_top_subspace_under_a_flat_tail() -> None:
    """Top 4 singular values 8..5 over a flat tail of 1s, 120 x 60, q = 14 columns: the range finder alone
    (no power iterations) is off by about 3e-2 in P P^T; with its 2 power iterations it is within 1e-4."""
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(120, 60, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64)).Q
    s = torch.cat([torch.tensor([8.0, 7.0, 6.0, 5.0], dtype=torch.float64), torch.ones(56, dtype=torch.float64)])
    p = torch.nn.Parameter(torch.zeros(120, 60))
    opt = GaLoreAdamW([{"params": [p], "rank": 4, "proj_type": "left", "svd_method": "randomized"}], lr=1e-3)
    p.grad = ((u * s) @ v.T).float()
    opt.step()
    P = opt.state[p]["proj_left"].double()
    torch.testing.assert_close(P @ P.T, u[:, :4] @ u[:, :4].T, atol=1e-4, rtol=0)


def test_an_svd_that_returns_nan_without_raising_keeps_the_previous_basis_and_counts_each_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CUDA's SVD returns NaN for a NaN input instead of raising (CPU's LAPACK raises): simulated here, the
    finiteness check must catch it, keep the previous basis and count every failed refresh."""
    p = torch.nn.Parameter(torch.zeros(40, 20))
    opt = GaLoreAdamW([{"params": [p], "rank": 4, "update_proj_gap": 1, "proj_type": "right"}], lr=1e-3)
    p.grad = torch.randn(40, 20, generator=torch.Generator().manual_seed(0))
    opt.step()
    Q = opt.state[p]["proj_right"].clone()
    nan = float("nan")
    monkeypatch.setattr(projector, "_svd", lambda g, *args: (torch.full((40, 20), nan), torch.full((20, 20), nan)))
    for _ in range(2):
        p.grad = torch.randn(40, 20)
        with pytest.warns(UserWarning, match="keeping the previous basis"):
            opt.step()
    assert torch.equal(opt.state[p]["proj_right"], Q) and opt.svd_failures == 2


# --- An independent float64 reference of the update (the module docstring's steps 1-6, written out) ---------------
# Nothing below calls optim's helpers: the statistics, bias corrections, projector refreshes and moment policies are
# spelled out from the docstring of optim/adamem.py (and optim/adafactor.py for the non-matrix parameters).

REF_OPTS: dict = dict(
    lr=0.1,
    weight_decay=0.1,
    rank=4,
    update_proj_gap=2,  # refreshes at steps 1 and 3 of the 4
    delta=0.5,  # not 1: a dropped delta shows
    beta1=0.9,
    beta2=0.95,
    beta2_decay=None,
    eps=1e-8,
    eps1=1e-30,
    clip_threshold=None,
    variant="adamem",
    second_moment_from="momentum",
    moments_on_proj_change="keep",
)


def _ref_beta2(o, t):
    """(beta2_t, c2(t)): constant beta2 with c2 = 1 - beta2^t, or beta2_t = 1 - t^beta2_decay with c2 = 1."""
    if o["beta2_decay"] is not None:
        return 1.0 - t ** o["beta2_decay"], 1.0
    return o["beta2"], 1.0 - o["beta2"] ** t


def _ref_ema(st, key, value, beta):
    st[key] = beta * st.get(key, torch.zeros_like(value)) + (1.0 - beta) * value


def _ref_two_sided(st, key, x, src, t, o):
    """x / (sqrt(V) + eps), V = row col^T / (mean(row) c2(t)); row, col: EMAs of the row, column means of src^2+eps1."""
    beta, c2 = _ref_beta2(o, t)
    q = src * src + o["eps1"]
    _ref_ema(st, key + "row", q.mean(dim=1), beta)
    _ref_ema(st, key + "col", q.mean(dim=0), beta)
    row, col = st[key + "row"], st[key + "col"]
    return x / ((torch.outer(row, col) / (row.mean() * c2)).sqrt() + o["eps"])


def _ref_one_sided(st, key, x, t, o):
    """x D3: x / (sqrt(c / c2(t)) + eps) broadcast over rows; c: EMA of the column means of x^2 + eps1 (length n)."""
    beta, c2 = _ref_beta2(o, t)
    _ref_ema(st, key, (x * x + o["eps1"]).mean(dim=0), beta)
    return x / ((st[key] / c2).sqrt() + o["eps"])


def _ref_clip(u, o):
    if o["clip_threshold"] is None:
        return u
    return u / max(1.0, float(u.pow(2).mean().sqrt()) / o["clip_threshold"])


def _ref_top_left_vectors(g, r):
    """U[:, :r] of the float64 SVD of g. Singular vectors are defined up to sign, and a momentum carried over a refresh
    (moments_on_proj_change 'keep') depends on each vector's sign: the optimizer's SVD runs in fp32 (docstring step 1),
    so each float64 vector takes the sign fp32 LAPACK gives it on the same g."""
    u64 = torch.linalg.svd(g, full_matrices=False).U[:, :r]
    u32 = torch.linalg.svd(g.float(), full_matrices=False).U[:, :r].double()
    return u64 * torch.sign((u64 * u32).sum(dim=0))


def _ref_matrix_step(w, grad, st, o):
    """One AdaMeM step of a matrix w (float64), returns the new w."""
    transposed = w.shape[0] > w.shape[1]  # m > n: run on G^T (the smaller side is P's), transpose U back
    g = grad.T if transposed else grad
    t = st["t"] = st.get("t", 0) + 1
    if (t - 1) % o["update_proj_gap"] == 0:  # step 1: refresh P (left singular vectors of g)
        new_P = _ref_top_left_vectors(g, o["rank"])
        if "P" in st and o["moments_on_proj_change"] == "reset":  # low-rank moments restart, t_m with them
            for key in ("M", "lr_row", "lr_col"):
                st.pop(key, None)
            st["t_m"] = 0
        elif "P" in st and o["moments_on_proj_change"] == "rotate":  # M re-expressed in the new basis
            st["M"] = new_P.T @ st["P"] @ st["M"]
        st["P"] = new_P
    t_m = st["t_m"] = st.get("t_m", 0) + 1
    P = st["P"]
    R = P.T @ g  # step 2
    S = g - P @ R
    b1 = o["beta1"] or 0.0  # step 3
    st["M"] = b1 * st.get("M", torch.zeros_like(R)) + (1.0 - b1) * R
    M_hat = st["M"] / (1.0 - b1**t_m)
    if o["variant"] == "variant1":  # X = P M_hat + delta S, two-sided Adafactor in the original space
        X = P @ M_hat + o["delta"] * S
        U = _ref_two_sided(st, "x_", X, X, t, o)
    else:
        src = M_hat if o["second_moment_from"] == "momentum" else R  # step 4
        N1 = _ref_two_sided(st, "lr_", M_hat, src, t_m, o)
        if o["variant"] == "adamem":  # step 5: one statistic per column
            N2 = _ref_one_sided(st, "res_col", S, t, o)
        else:  # variant2: two-sided on S
            N2 = _ref_two_sided(st, "res_", S, S, t, o)
        U = P @ N1 + o["delta"] * N2  # step 6
    U = _ref_clip(U, o)
    if transposed:
        U = U.T
    return w - o["lr"] * o["weight_decay"] * w - o["lr"] * U


def _ref_vector_step(w, g, st, o):
    """A 1-D parameter: plain Adafactor (optim/adafactor.py docstring), full second moment, Adam-style momentum."""
    t = st["t"] = st.get("t", 0) + 1
    beta, c2 = _ref_beta2(o, t)
    _ref_ema(st, "v", g * g + o["eps1"], beta)
    x = g
    if o["beta1"] is not None:
        st["m"] = o["beta1"] * st.get("m", torch.zeros_like(g)) + (1.0 - o["beta1"]) * g
        x = st["m"] / (1.0 - o["beta1"] ** t)
    u = _ref_clip(x / ((st["v"] / c2).sqrt() + o["eps"]), o)
    return w - o["lr"] * o["weight_decay"] * w - o["lr"] * u


def _prefixed(what: str) -> Callable[[str], str]:
    return lambda message: f"{what}: {message}"


REF_SHAPES = [(12, 20), (20, 12), (16, 16), (20,)]  # a square matrix runs untransposed (m <= n)
REF_CASES = [
    {},
    {"second_moment_from": "gradient"},
    {"clip_threshold": 0.5},
    {"beta2_decay": -0.8},  # beta2_t = 1 - t^-0.8, no bias correction (beta2 unused)
    {"beta1": None},
    {"moments_on_proj_change": "reset"},
    {"moments_on_proj_change": "rotate"},
    {"variant": "variant1"},
    {"variant": "variant1", "clip_threshold": 0.5},
    {"variant": "variant1", "moments_on_proj_change": "rotate"},
    {"variant": "variant1", "moments_on_proj_change": "reset"},  # its statistics are not reset: c2(t), not c2(t_m)
    {"variant": "variant2"},
]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("case", REF_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_float64_reference(case, fast):
    """Weights after each of 4 steps (a projector refresh at step 3, weight decay, delta .5) for a 12x20, a 20x12
    and a 16x16 matrix and a 1-D parameter, fp32 optimizer vs the float64 reference above; and each step's update."""
    o = {**REF_OPTS, **case}
    steps = 4
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in REF_SHAPES]
    grads = [
        _grads(shape, steps, seed=i) if len(shape) == 2 else [torch.randn(shape, generator=gen) for _ in range(steps)]
        for i, shape in enumerate(REF_SHAPES)
    ]
    opt = AdaMeM(params, fast=fast, **o)
    ref_w = [p.detach().double().clone() for p in params]
    ref_st: list[dict] = [{} for _ in params]
    for step in range(steps):
        before = [p.detach().clone() for p in params]
        for p, gs in zip(params, grads, strict=True):
            p.grad = gs[step].clone()
        opt.step()
        for i, p in enumerate(params):
            g = grads[i][step].double()
            prev = ref_w[i]
            step_fn = _ref_matrix_step if p.dim() == 2 else _ref_vector_step
            ref_w[i] = step_fn(prev, g, ref_st[i], o)
            what = f"step {step + 1}, shape {tuple(p.shape)}"
            # fp32 rounding: assert_close's float32 defaults (the reference is float64). The update itself (~0.1,
            # against weights ~1) is checked tighter than the weights' atol allows: measured error ~5e-6 relative.
            torch.testing.assert_close(p.detach().double(), ref_w[i], rtol=1.3e-6, atol=1e-5, msg=_prefixed(what))
            update = (before[i] - p.detach()).double()
            torch.testing.assert_close(update, prev - ref_w[i], rtol=1e-4, atol=1e-6, msg=_prefixed(f"update, {what}"))


@pytest.mark.parametrize("fast", [True, False])
def test_tiny_gradients_match_the_float64_reference(fast):
    """Gradients ~1e-8, the size of eps: eps = 1e-8 then halves the normalised update (Adam's eps), in the
    low-rank part and in the residual part alike; the other reference cases have gradients ~1 where eps is
    below fp32 rounding."""
    o = {**REF_OPTS, "lr": 1e-3, "weight_decay": 0.0}
    shapes = [(12, 20), (20, 12)]
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]
    grads = [[g * 1e-8 for g in _grads(shape, 3, seed=i)] for i, shape in enumerate(shapes)]
    opt = AdaMeM(params, fast=fast, **o)
    ref_st: list[dict] = [{} for _ in params]
    for step in range(3):
        before = [p.detach().double().clone() for p in params]
        for p, gs in zip(params, grads, strict=True):
            p.grad = gs[step].clone()
        opt.step()
        for i, p in enumerate(params):
            expected = before[i] - _ref_matrix_step(before[i], grads[i][step].double(), ref_st[i], o)
            what = f"update, step {step + 1}, shape {tuple(p.shape)}"
            torch.testing.assert_close(
                before[i] - p.detach().double(), expected, rtol=1e-3, atol=1e-7, msg=_prefixed(what)
            )


@pytest.mark.parametrize("clip_threshold", [None, 0.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_variant1_first_step_is_adafactor_on_the_gradient(shape, clip_threshold):
    """Step 1: M_hat = R, so with delta 1 X = P R + S = G, and variant1 is Adafactor (no momentum) on G."""
    opts = dict(lr=0.1, weight_decay=0.1, eps=1e-8, eps1=1e-30, clip_threshold=clip_threshold)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    pa, pb = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    adamem = AdaMeM([pa], beta1=0.9, rank=4, variant="variant1", delta=1.0, **opts)
    adafactor = Adafactor([pb], beta1=None, **opts)
    g = _grads(shape, 1)[0]
    ua, ub = _update(pa, adamem, g), _update(pb, adafactor, g)
    assert ua.abs().max() > 1e-2
    torch.testing.assert_close(ua, ub, rtol=1e-5, atol=1e-7)
