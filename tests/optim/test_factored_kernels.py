"""The fast path of Adafactor and AdaLomo (optim/factored_kernels.py) against their readable reference code
(`fast=False`): the same parameters and state to fp32 rounding, over several steps, for every switch the fast
path takes; the rest (one-sided, hf momentum, rank-r factorizations, coupled normalisation) stays on the
reference code, bit for bit."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence

import pytest
import torch

from optim import Adafactor
from optim.adalomo import AdaLomo
from optim.adamem import AdaMeM
from optim.factored_kernels import workspace

SHAPES = [(48, 32), (16, 80), (1, 40), (40,)]  # tall, wide, a single row, a vector (always the reference code)


def _train(make, steps: int = 6, shapes: Sequence[tuple[int, ...]] = SHAPES) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    opt = make(params)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * (0.1 if step % 2 else 3.0)  # changing scales
        opt.step()
    return [p.detach() for p in params], opt.state


def assert_close_to_reference(fast, ref, exact: bool) -> None:
    for a, b in zip(fast[0], ref[0], strict=True):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
    for sa, sb in zip(fast[1].values(), ref[1].values(), strict=True):
        assert sa.keys() == sb.keys()  # the same state layout: checkpoints move between the two
        for k in sa:
            if torch.is_tensor(sa[k]):  # entries near zero (a momentum that cancels) differ on the tensor's scale
                torch.testing.assert_close(sa[k], sb[k], rtol=2e-6, atol=1e-6 * float(sb[k].abs().max()))


ADAFACTOR = [
    dict(beta1=beta1, clip_threshold=clip, eps=eps, weight_decay=wd, scale_parameter=sp, relative_step=rs)
    for beta1, clip, eps, wd, (sp, rs) in itertools.product(
        (None, 0.9), (None, 1.0), (0.0, 1e-8), (0.0, 0.1, 1e-13), ((False, False), (True, True))
    )
]


@pytest.mark.parametrize("kw", ADAFACTOR, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_adafactor_fast_path_equals_the_reference(kw):
    fast = _train(lambda ps: Adafactor(ps, lr=1e-2, beta2_decay=-0.8, **kw))
    ref = _train(lambda ps: Adafactor(ps, lr=1e-2, beta2_decay=-0.8, fast=False, **kw))
    assert_close_to_reference(fast, ref, exact=False)


@pytest.mark.parametrize("kw", [dict(one_sided=True), dict(momentum_style="hf", beta1=0.9)], ids=["one_sided", "hf"])
def test_adafactor_switches_off_the_fast_path_run_the_reference_bit_for_bit(kw):
    assert_close_to_reference(
        _train(lambda ps: Adafactor(ps, lr=1e-2, **kw)),
        _train(lambda ps: Adafactor(ps, lr=1e-2, fast=False, **kw)),
        True,
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(weight_decay=0.1),
        dict(weight_decay=1e-13),  # below MIN_FOLDED_WEIGHT_DECAY: decay pass + addcmul, not the lerp
        dict(update_norm="none", weight_decay=0.1),
        dict(clip_threshold=0.5, eps2=1e-2),
    ],
    ids=["default", "decay", "tiny_decay", "no_norm", "clip"],
)
def test_adalomo_fast_path_equals_the_reference(kw):
    fast = _train(lambda ps: AdaLomo(ps, lr=1e-2, **kw))
    ref = _train(lambda ps: AdaLomo(ps, lr=1e-2, fast=False, **kw))
    assert_close_to_reference(fast, ref, exact=False)


@pytest.mark.parametrize("kw", [dict(update_norm="layerwise"), dict(factorization="svd", factor_rank=2)])
def test_adalomo_modes_off_the_fast_path_run_the_reference_bit_for_bit(kw):
    assert_close_to_reference(
        _train(lambda ps: AdaLomo(ps, lr=1e-2, **kw)), _train(lambda ps: AdaLomo(ps, lr=1e-2, fast=False, **kw)), True
    )


ADAMEM_SHAPES = [(16, 48), (48, 16), (8, 40), (4, 12)]  # wide, tall (transposed), rank < m, rank >= m (S = 0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(clip_threshold=1.0, weight_decay=0.1),
        dict(weight_decay=0.1),  # no clip: c U built at once, one lerp
        dict(weight_decay=1e-13),  # below MIN_FOLDED_WEIGHT_DECAY
        dict(scale_parameter=True, relative_step=True, beta2_decay=-0.8, weight_decay=0.1),  # 0-d tensor scales
        dict(second_moment_from="gradient", beta1=None, moments_on_proj_change="reset"),
    ],
    ids=["default", "clip_decay", "decay", "tiny_decay", "relative", "gradient_reset"],
)
def test_adamem_fast_path_equals_the_reference(kw):
    def train(fast: bool) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s)) for s in ADAMEM_SHAPES]
        group = {"params": params, "rank": 6, "update_proj_gap": 3, "names": [f"w{i}" for i in range(len(params))]}
        opt = AdaMeM([group], lr=1e-2, fast=fast, **{"beta1": 0.9, **kw})
        g = torch.Generator().manual_seed(1)
        for step in range(7):  # projector refreshes at steps 1, 4, 7
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * (0.1 if step % 2 else 3.0)
            opt.step()
        return [p.detach() for p in params], opt.state

    assert_close_to_reference(train(True), train(False), exact=False)


def _adamem(params, **kw):
    from optim.adamem import AdaMeM

    group = {"params": params, "rank": 6, "update_proj_gap": 3, "names": [f"w{i}" for i in range(len(params))]}
    return AdaMeM([group], lr=1e-2, beta1=0.9, **kw)


ZERO_RATE: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adafactor": lambda ps, **kw: Adafactor(ps, lr=1e-2, **kw),
    "adafactor_momentum": lambda ps, **kw: Adafactor(ps, lr=1e-2, beta1=0.9, **kw),
    "adafactor_scaled": lambda ps, **kw: Adafactor(ps, lr=1e-2, scale_parameter=True, **kw),  # a 0-d tensor rate
    "adalomo": lambda ps, **kw: AdaLomo(ps, lr=1e-2, **kw),
    "adamem": _adamem,
}


@pytest.mark.parametrize("name", ZERO_RATE)
def test_a_zero_learning_rate_with_weight_decay_leaves_the_weights_as_the_reference_does(name):
    """A schedule that ends at final_lr_ratio 0 sets lr 0 on its last step: the folded update's factor divides by
    the rate (factored_kernels.folded_scale), so that step must not fold (it gave NaN weights or ZeroDivisionError)."""

    def train(fast: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s)) for s in ADAMEM_SHAPES]
        opt = ZERO_RATE[name](params, weight_decay=0.1, fast=fast)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            if step == 3:
                before = [p.detach().clone() for p in params]
                for group in opt.param_groups:
                    group["lr"] = 0.0
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return before, [p.detach() for p in params], opt.state

    before, *fast = train(True)
    _, *ref = train(False)
    assert_close_to_reference(fast, ref, exact=False)
    for a, b in zip(fast[0], before, strict=True):
        assert torch.equal(a, b)  # p (1 - 0) - 0 u


@pytest.mark.parametrize("name", ["adafactor_scaled", "adalomo"])
def test_eps2_zero_on_a_zero_matrix_with_weight_decay_equals_the_reference(name):
    """With eps2 = 0 the rate max(eps2, RMS(W)) lr of a zero matrix (LoRA's B at the start) is 0: no folding."""

    def train(fast: bool) -> tuple[list[torch.Tensor], dict]:
        g = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.zeros(16, 48)), torch.nn.Parameter(torch.randn(48, 16, generator=g))]
        opt = ZERO_RATE[name](params, weight_decay=0.1, eps2=0.0, fast=fast)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return [p.detach() for p in params], opt.state

    fast, ref = train(True), train(False)
    assert all(bool(p.isfinite().all()) for p in fast[0])
    assert_close_to_reference(fast, ref, exact=False)


@pytest.mark.parametrize("name", ["adafactor", "adalomo"])
def test_a_zero_gradient_column_and_row_equal_the_reference(name: str) -> None:
    """eps1 keeps both statistics of an all-zero gradient column or row positive (as the reference's g^2 + eps1):
    without it the factor is 0 (Adafactor with eps 0: 0 / 0) or its rsqrt inf (AdaLomo: 0 * inf), NaN weights."""

    def train(fast: bool) -> tuple[list[torch.Tensor], dict]:
        g = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(16, 48, generator=g))]
        opt = ZERO_RATE[name](params, fast=fast, **(dict(eps=0.0) if name == "adafactor" else {}))
        for _ in range(3):
            grad = torch.randn(16, 48, generator=g)
            grad[:, 5] = 0.0  # an unused input feature
            grad[3, :] = 0.0  # an unused output row
            params[0].grad = grad
            opt.step()
        return [p.detach() for p in params], opt.state

    fast, ref = train(True), train(False)
    assert all(bool(p.isfinite().all()) for p in ref[0])
    assert_close_to_reference(fast, ref, exact=False)


@pytest.mark.parametrize("name", ["adafactor", "adalomo", "adamem"])
def test_a_weight_decay_below_the_folding_limit_equals_the_reference(name: str) -> None:
    """The folded update's factor is -scale / (rate * weight_decay): at weight_decay 1e-39 it leaves the fp32 range,
    so such a decay (below MIN_FOLDED_WEIGHT_DECAY) takes the decay pass + addcmul instead."""
    fast = _train(lambda ps: ZERO_RATE[name](ps, weight_decay=1e-39, fast=True), 3, ADAMEM_SHAPES)
    ref = _train(lambda ps: ZERO_RATE[name](ps, weight_decay=1e-39, fast=False), 3, ADAMEM_SHAPES)
    assert all(bool(p.isfinite().all()) for p in fast[0])
    assert_close_to_reference(fast, ref, exact=False)


def test_the_cpu_workspace_is_one_buffer_per_thread_shape_and_slot() -> None:
    """Updates run concurrently on gloo's threads under DDP (trainer/ddp_fused.py): two threads must never share
    a direction buffer, while one thread reuses its own."""
    like = torch.empty(7, 13)
    mine = workspace(like)
    assert workspace(like) is mine and workspace(like, 1) is not mine
    assert mine.shape == (7, 13) and mine.dtype == torch.float32
    other: list[torch.Tensor] = []
    t = threading.Thread(target=lambda: other.append(workspace(like)))
    t.start()
    t.join()
    assert other[0] is not mine and other[0].data_ptr() != mine.data_ptr()
