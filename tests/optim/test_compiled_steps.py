"""`optim.compile` (optim/compiled_steps.py): Adafactor's and AdaLomo's fast path as compiled functions, against
their readable reference code (`fast=False`) to fp32 rounding over several steps with changing gradient scales
and learning rates; one graph per variant (no recompile per step or per shape), no graph breaks; updates from
another thread (DDP's fused callbacks) and inside backward (the fused path); the trainer's config key. CPU
Inductor: each test compiles a few graphs (seconds)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch._dynamo.utils import counters

from optim import Adafactor, OptimConfig, optimizer_spec
from optim.adalomo import AdaLomo
from optim.in_backward import InBackwardOptimizer
from optim.validation import validate_optim_config
from tests.helpers.tiny_lm import batch, loss_of, tiny_model
from tests.optim.test_factored_kernels import SHAPES, assert_close_to_reference
from trainer.resume_policy import may_change

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from scratch: its graph counts are its own, and no test runs into the recompile limit
    (past it, Dynamo would quietly run the functions uncompiled)."""
    torch.compiler.reset()
    counters.clear()
    yield
    torch.compiler.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _train(make, steps: int = 6, graphs_after: list[int] | None = None) -> tuple[list[torch.Tensor], dict]:
    """test_factored_kernels' training, with the learning rate moving every step as a scheduler's would;
    `graphs_after` collects the compiled graph count after each step."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    opt = make(params)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (step + 1) / steps
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * (0.1 if step % 2 else 3.0)
        opt.step()
        if graphs_after is not None:
            graphs_after.append(_graphs())
    return [p.detach() for p in params], opt.state


def _assert_compiled_once(graphs_after: list[int]) -> None:
    """Graphs were compiled on the first step (two functions x two shape classes: the 1-row matrix specialises),
    none after it, and nothing fell back to Python."""
    assert 2 <= graphs_after[0] <= 4, graphs_after
    assert graphs_after[-1] == graphs_after[0], f"recompiled after the first step: {graphs_after}"
    assert not counters["graph_break"], dict(counters["graph_break"])


# Every pair of (momentum, RMS clip, tensor learning rate: scale_parameter) in five runs (each compiles its own
# graphs: seconds): the paper's constant beta2 (bias-corrected), and HF's relative step with beta2_t = 1 - t^-0.8.
ADAFACTOR = [
    dict(beta1=beta1, clip_threshold=clip, eps=1e-8, weight_decay=0.1, scale_parameter=sp, relative_step=sp)
    | (dict(beta2_decay=-0.8) if sp else dict(beta2=0.95))
    for beta1, clip, sp in ((None, None, False), (None, 1.0, True), (0.9, None, True), (0.9, 1.0, False))
] + [dict(beta1=0.9, eps=0.0, weight_decay=0.0)]


@pytest.mark.parametrize("kw", ADAFACTOR, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_compiled_adafactor_equals_the_reference(kw):
    graphs: list[int] = []
    compiled = _train(lambda ps: Adafactor(ps, compiled=True, **kw), graphs_after=graphs)
    _assert_compiled_once(graphs)
    ref = _train(lambda ps: Adafactor(ps, fast=False, **kw))
    assert_close_to_reference(compiled, ref, exact=False)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(update_norm="none", weight_decay=0.1), dict(clip_threshold=0.5, eps2=1e-2, weight_decay=0.1)],
    ids=["default", "no_norm_decay", "clip_decay"],
)
def test_compiled_adalomo_equals_the_reference(kw):
    graphs: list[int] = []
    compiled = _train(lambda ps: AdaLomo(ps, compiled=True, **kw), graphs_after=graphs)
    _assert_compiled_once(graphs)
    assert_close_to_reference(compiled, _train(lambda ps: AdaLomo(ps, fast=False, **kw)), exact=False)


def test_momentum_switched_on_after_the_first_step_gets_its_state_as_in_the_reference():
    """param_groups' beta1 set from None to 0.9 at step 3 (through the API: the trainer refuses it on resume): the
    compiled path creates exp_avg then, as the eager paths do, instead of running without momentum."""

    def train(**kw) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
        opt = Adafactor(params, lr=1e-2, beta1=None, **kw)
        g = torch.Generator().manual_seed(1)
        for step in range(5):
            if step == 2:
                opt.param_groups[0]["beta1"] = 0.9
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return [p.detach() for p in params], opt.state

    assert_close_to_reference(train(compiled=True), train(fast=False), exact=False)


def test_a_run_may_switch_optim_compile_on_resume():
    """The compiled and the eager path keep the same state: an eager run's optimizer state goes on compiled (and
    the resume policy lets optim.compile change) to fp32 rounding of the eager run."""
    assert may_change("optim.compile")

    def run(compiled_after: int | None) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
        opt = Adafactor(params, beta1=0.9, weight_decay=0.1)
        g = torch.Generator().manual_seed(1)
        for step in range(6):
            if step == compiled_after:  # "resume": a new optimizer, compiled, from the saved state
                saved = opt.state_dict()
                opt = Adafactor(params, beta1=0.9, weight_decay=0.1, compiled=True)
                opt.load_state_dict(saved)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return [p.detach() for p in params], opt.state

    assert_close_to_reference(run(compiled_after=3), run(compiled_after=None), exact=False)
    assert _graphs() > 0


def test_compiled_updates_run_from_another_thread():
    """DDP's fused updates run in the all-reduce futures' callbacks, on the process group's threads."""
    out: list[tuple[list[torch.Tensor], dict]] = []
    worker = threading.Thread(target=lambda: out.append(_train(lambda ps: Adafactor(ps, beta1=0.9, compiled=True))))
    worker.start()
    worker.join()
    assert_close_to_reference(out[0], _train(lambda ps: Adafactor(ps, beta1=0.9, fast=False)), exact=False)
    assert _graphs() > 0


@pytest.mark.parametrize("name", ["adalomo", "adafactor"])
def test_compiled_updates_inside_backward_equal_the_eager_path(name):
    """The fused path (optim/in_backward.py) calls the compiled update from the gradient hooks, during backward:
    the same model as the eager fast path's (itself held to the reference code by test_factored_kernels)."""

    def run(**kw) -> torch.nn.Module:
        model = tiny_model()
        opt = InBackwardOptimizer(optimizer_spec(model, OptimConfig(name=name, lr=1e-2, beta1=None, **kw)))
        for s in range(3):
            opt.arm(True)
            loss_of(model, batch(s)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model

    compiled, ref = run(compile=True), run()
    assert _graphs() > 0 and not counters["graph_break"]
    for (n, a), b in zip(compiled.named_parameters(), ref.parameters(), strict=True):
        diff = float((a.detach() - b.detach()).abs().max())
        assert torch.allclose(a, b, rtol=2e-6, atol=1e-7), f"{n}: max difference {diff}"


def test_optim_compile_is_read_by_the_factored_optimizers_only():
    for name in ("adafactor", "adalomo", "adamem", "galore_adafactor"):
        validate_optim_config(OptimConfig(name=name, compile=True))
    with pytest.raises(ValueError, match=r"optim.compile=True is not read by adamw.*adafactor"):
        validate_optim_config(OptimConfig(name="adamw", compile=True))


def test_compiled_adalomo_moves_a_zero_matrix_by_eps2_as_the_reference() -> None:
    """The rate is lr max(eps2, RMS(W)): a zero matrix (LoRA's B at the start) still moves, with eta = lr eps2."""

    def train(fast: bool, compiled: bool) -> tuple[list[torch.Tensor], dict]:
        g = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.zeros(16, 48)), torch.nn.Parameter(torch.randn(48, 16, generator=g))]
        opt = AdaLomo(params, lr=1e-2, eps2=1e-3, weight_decay=0.1, fast=fast, compiled=compiled)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return [p.detach() for p in params], opt.state

    compiled, ref = train(fast=True, compiled=True), train(fast=False, compiled=False)
    assert bool(ref[0][0].abs().max() > 0)
    assert_close_to_reference(compiled, ref, exact=False)
