"""The two update strategies behind the one training loop (trainer/update.py)."""

import math

import pytest
import torch

from optim import OptimConfig, optimizer_spec
from tests.helpers.tiny_lm import batch, loss_of, tiny_model
from trainer.update import StepAfterBackward, UpdateInBackward, build_update_strategy

torch.set_num_threads(1)


def make(name: str, fused: bool, max_grad_norm: float = 0.0, **options):
    torch.manual_seed(0)
    model = tiny_model()
    spec = optimizer_spec(model, OptimConfig(name=name, lr=1e-2, **options))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, build_update_strategy(spec, params, fused=fused, max_grad_norm=max_grad_norm)


def run_steps(model, updater, steps: int, micro_batches: int = 2) -> list[float]:
    """The trainer's protocol: lr -> before_backward/backward per micro-batch -> finish -> commit."""
    norms = []
    for step in range(steps):
        updater.set_lr_factor((step + 1) / steps)
        for i in range(micro_batches):
            updater.before_backward(i == micro_batches - 1)
            (loss_of(model, batch(seed=10 * step + i)) / micro_batches).backward()
        norms.append(float(updater.finish_backward()))
        updater.commit()
    return norms


@pytest.mark.parametrize("name", ["adamw", "adafactor", "galore_adamw", "adamem", "adalomo"])
def test_both_strategies_give_the_same_parameters_and_norms(name):
    options = {"rank": 4, "update_proj_gap": 2} if name in ("galore_adamw", "adamem") else {}
    plain_model, plain = make(name, fused=False, **options)
    fused_model, fused = make(name, fused=True, **options)
    assert isinstance(plain, StepAfterBackward) and isinstance(fused, UpdateInBackward)
    norms_plain, norms_fused = run_steps(plain_model, plain, 3), run_steps(fused_model, fused, 3)
    assert norms_plain == pytest.approx(norms_fused, rel=1e-5)
    for (n, a), b in zip(plain_model.named_parameters(), fused_model.parameters(), strict=True):
        assert torch.equal(a, b), n
        assert a.grad is None and b.grad is None  # gradients freed after the step either way
    assert plain.counters() == fused.counters()


def test_clipping_scales_gradients_to_the_limit_and_reports_the_norm_before():
    model, updater = make("adamw", fused=False, max_grad_norm=1e-3)
    updater.before_backward(True)
    loss_of(model, batch(seed=1)).backward()
    norm = float(updater.finish_backward())
    clipped = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None))
    assert norm > 1e-3 and clipped == pytest.approx(1e-3, rel=1e-4)


def test_peak_lr_comes_from_the_config_not_from_a_restored_state():
    model, updater = make("adamw", fused=False)
    saved = updater.state_dict()
    for group in saved["param_groups"]:
        group["lr"] = 123.0
    updater.load_state_dict(saved)
    updater.set_lr_factor(0.5)
    assert all(group["lr"] == pytest.approx(0.5e-2) for group in updater.param_groups)


@pytest.mark.parametrize("fused", [False, True])
def test_the_lr_factor_scales_the_peak_lr_not_the_current_one(fused: bool) -> None:
    """The schedule sets lr = peak x factor every step: the same factor twice gives the same lr, and a factor of 0
    (a warmup's first step) does not stick."""
    _, updater = make("adamw", fused=fused)
    for factor, lr in ((0.5, 0.5e-2), (0.5, 0.5e-2), (0.0, 0.0), (0.25, 0.25e-2), (1.0, 1e-2)):
        updater.set_lr_factor(factor)
        lrs = [group["lr"] for group in updater.param_groups]
        assert lrs and lrs == pytest.approx([lr] * len(lrs)), factor


def test_a_state_of_the_other_strategy_is_refused_with_the_fix():
    _, plain = make("adamw", fused=False)
    _, fused = make("adamw", fused=True)
    with pytest.raises(ValueError, match="fused_update=true .*resume with --train.fused_update=true"):
        plain.load_state_dict(fused.state_dict())
    with pytest.raises(ValueError, match="fused_update=false .*resume with --train.fused_update=false"):
        fused.load_state_dict(plain.state_dict())


def test_non_finite_gradients_report_an_infinite_norm_in_both_strategies():
    for fused in (False, True):
        model, updater = make("adamw", fused=fused)
        updater.before_backward(True)
        (loss_of(model, batch(seed=1)) * float("nan")).backward()
        assert not math.isfinite(float(updater.finish_backward()))


@pytest.mark.parametrize("fused_update", [False, True])
def test_resuming_keeps_the_optimizer_implementation_this_run_built(fused_update):
    """optim.fused null follows the machine (fused AdamW on CUDA only): a run started on the CPU and resumed on a GPU
    takes the GPU's implementation, not the saved param group's flag; the state itself is the saved one. (Emulated
    on the CPU with optim.fused false, then true.)"""

    def build(fused_kernel: bool):
        torch.manual_seed(0)
        model = tiny_model()
        spec = optimizer_spec(model, OptimConfig(name="adamw", lr=1e-2, fused=fused_kernel))
        params = [p for p in model.parameters() if p.requires_grad]
        return model, build_update_strategy(spec, params, fused=fused_update, max_grad_norm=0.0)

    model, first = build(fused_kernel=False)
    run_steps(model, first, 2)
    saved = first.state_dict()
    resumed_model, resumed = build(fused_kernel=True)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    assert {g["fused"] for g in resumed.param_groups} == {True}
    assert {g["foreach"] for g in resumed.param_groups} == {None}
    states = resumed.optimizer.state_dict()
    want = saved["in_backward"] if fused_update else {"": saved}
    got = states["in_backward"] if fused_update else {"": states}
    # After two AdamW steps every trained parameter has its moments: the comparison below covers all of them.
    assert sum(len(sd["state"]) for sd in want.values()) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, sd in want.items():
        for idx, entry in sd["state"].items():
            assert torch.equal(got[name]["state"][idx]["exp_avg"], entry["exp_avg"])
    weights = [p.detach().clone() for p in resumed_model.parameters()]
    run_steps(resumed_model, resumed, 1)  # fused AdamW steps on from the loaded state
    assert all(not torch.equal(a, p) for a, p in zip(weights, resumed_model.parameters(), strict=True))
