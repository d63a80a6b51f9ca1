"""GaLore's projected backward (optim/projected_backward.py, optim/projected_grads.py): exact input
gradients, R = project(G) for every side, FLOPs equal to the closed form (G never formed), parity with
the ordinary GaLore path across projector refreshes with accumulation (ordinary and fused), the clipping
rule, resume bit-exact, refusals, and the benchmark tool at a tiny size."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from optim import OptimConfig, optimizer_spec
from optim.galore import GaLoreAdamW
from optim.in_backward import InBackwardOptimizer
from optim.projected_backward import (
    backward_flops,
    check_projected_backward_supported,
    install_projected_backward,
    projected_linear,
    projected_linear_weight_names,
)
from optim.projector import project
from tests.helpers.gloo import run_ranks
from tests.helpers.runs import REPO, final_model, losses, max_rel_difference, run, tiny_overrides, train_jobs_as_rank
from tests.helpers.tiny_lm import batch, loss_of, tiny_model
from tools import bench_projected_backward as bench_pb
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, load_config, validate
from trainer.metrics import read_metrics
from trainer.update import StepAfterBackward

torch.set_num_threads(1)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q.float()


def bases_for(side: str, m: int, n: int, r: int) -> dict[str, torch.Tensor]:
    out = {}
    if side in ("left", "full"):
        out["proj_left"] = orthonormal(m, r, 1)  # m x r
    if side in ("right", "full"):
        out["proj_right"] = orthonormal(n, r, 2).T.contiguous()  # r x n
    return out


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["m>=n", "m<n"])
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_input_gradient_is_exact_and_the_weight_gets_only_project_of_G(side, shape):
    m, n = shape
    r = 8
    g = torch.Generator().manual_seed(0)
    w = torch.randn(m, n, generator=g, requires_grad=True)
    x = torch.randn(3, 5, n, generator=g, requires_grad=True)
    gy = torch.randn(3, 5, m, generator=g)
    # Reference: the ordinary linear (G formed), projected afterwards in float64.
    x_ref = x.detach().clone().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    F.linear(x_ref, w_ref).backward(gy)
    assert w_ref.grad is not None and x_ref.grad is not None
    bases = bases_for(side, m, n, r)
    expected = project(w_ref.grad.double(), {k: v.double() for k, v in bases.items()})

    carrier_shape = tuple(expected.shape)
    carrier = torch.zeros(()).expand(carrier_shape).requires_grad_()
    y = projected_linear(x, w, carrier, bases)
    assert torch.equal(y, F.linear(x_ref, w_ref))
    y.backward(gy)
    assert x.grad is not None
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert w.grad is None  # no full gradient
    assert carrier.grad is not None and carrier.grad.dtype == torch.float32
    torch.testing.assert_close(carrier.grad.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_backward_flops_equal_the_closed_form_and_G_is_never_formed(side):
    m, n, r, z = 96, 64, 8, 40
    w = torch.randn(m, n, requires_grad=True)
    x = torch.randn(4, 10, n, requires_grad=True)
    gy = torch.randn(4, 10, m)
    carrier = torch.zeros(()).expand(project(torch.zeros(m, n), bases_for(side, m, n, r)).shape).requires_grad_()
    y = projected_linear(x, w, carrier, bases_for(side, m, n, r))
    with FlopCounterMode(display=False) as counter:
        y.backward(gy)
    projected = counter.get_total_flops()
    assert projected == backward_flops(z, m, n, r, side)
    y = F.linear(x, w)
    with FlopCounterMode(display=False) as counter:
        y.backward(gy)
    assert counter.get_total_flops() == backward_flops(z, m, n, None, None) == 4 * z * m * n
    # The input gradient alone costs 2 z m n: what is left is far below G's 2 z m n.
    assert projected - 2 * z * m * n < z * m * n


def test_backward_flops_use_min_rank_m_n_when_the_rank_exceeds_the_layer() -> None:
    """z 10, m 8, n 6, rank 8 -> r 6: 2 z m n = 960, plus 2 z r (m + n) = 1680, plus 2 z r^2 = 720 for full."""
    assert backward_flops(10, 8, 6, 8, "right") == 960 + 1680
    assert backward_flops(10, 8, 6, 8, "full") == 960 + 1680 + 720


def galore_config(name: str, **kw: Any) -> OptimConfig:
    base: dict[str, Any] = dict(name=name, rank=8, update_proj_gap=2, weight_decay=0.1)
    base.update(kw)
    return OptimConfig(**base)


def lr_at(step: int) -> float:
    # Small enough that the weights stay within ~1e-7 of each other: at a refresh the SVD of a G that
    # differs by rounding can rotate near-degenerate singular vectors, which a large lr amplifies
    # (at 1e-2 the paths drift to 2e-3 by step 5; at 1e-3 they stay within 1.2e-7).
    return 1e-3 * (step + 1) / 3


def train_steps(cfg: OptimConfig, *, fused: bool, steps: int = 5, accum: int = 2, check=None):
    """`steps` steps of 2 micro-batches on the tiny LM; installs the projected backward when the config asks."""
    model = tiny_model()
    spec = optimizer_spec(model, cfg)
    opt: Any = InBackwardOptimizer(spec) if fused else spec.build()
    if cfg.projected_backward:
        handle = install_projected_backward(model, opt)
        assert len(handle.installed) == 8 and handle.skipped == []  # 2 blocks x (qkv, out, up, down)
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(s)
        for k in range(accum):
            if fused:
                opt.arm(k == accum - 1)
            (loss_of(model, batch(s * accum + k)) / accum).backward()
        if check is not None:
            check(s, model, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def max_diff(m1: nn.Module, m2: nn.Module) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))


@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor"])
def test_parameters_equal_the_ordinary_galore_path_across_refreshes(name, proj_type):
    """5 steps at update_proj_gap=2 (refreshes at steps 0, 2, 4), 2 micro-batches each."""
    cfg = galore_config(name, proj_type=proj_type)
    seen = []

    def check(step, model, opt):
        weights = opt.projected_backward_params()
        full = [p.grad is not None for p in weights]
        seen.append(sum(full))
        if step % 2:  # between refreshes: no full gradient anywhere, only the carriers'
            assert not any(full)
            assert all(opt.grad_carrier(p).grad is not None for p in weights)
        else:
            assert all(full)

    ordinary, _ = train_steps(cfg, fused=False)
    projected, opt = train_steps(
        galore_config(name, proj_type=proj_type, projected_backward=True), fused=False, check=check
    )
    assert seen == [8, 0, 8, 0, 8]
    assert max_diff(ordinary, tiny_model()) > 1e-4  # it trained
    assert max_diff(ordinary, projected) < 1e-6
    assert opt.state_dict().keys() == optimizer_spec(tiny_model(), cfg).build().state_dict().keys()


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor"])
def test_fused_update_matches_the_ordinary_path(name):
    ordinary, _ = train_steps(galore_config(name), fused=False)
    fused_projected, opt = train_steps(galore_config(name, projected_backward=True), fused=True)
    assert max_diff(ordinary, fused_projected) < 1e-6
    # And bit for bit the non-fused projected path (the same per-parameter math).
    projected, _ = train_steps(galore_config(name, projected_backward=True), fused=False)
    assert max_diff(projected, fused_projected) == 0.0
    assert all(opt.grad_carrier(p).grad is None for p in opt.projected_backward_params())  # freed


def test_clipping_uses_the_norm_of_the_consumed_gradients_and_clips_R_like_G():
    """Rule (optim/projected_backward.py): N^2 = sum ||R||^2 (projected weights) + sum ||G||^2 (the rest),
    every consumed gradient scaled by c = min(1, max / (N + 1e-6)). Independent check: the ordinary
    path, its G's projected by hand for N, then clipped by that c, gives the same parameters."""
    cfg = galore_config("galore_adamw", projected_backward=True)
    max_norm = 0.05
    model, ref = tiny_model(), tiny_model()
    params = [p for p in model.parameters()]
    upd = StepAfterBackward(optimizer_spec(model, cfg), params, max_norm)
    install_projected_backward(model, upd.optimizer)
    ref_opt = optimizer_spec(ref, galore_config("galore_adamw")).build()
    names = [n for n, _ in model.named_parameters()]
    low_names = {
        names[i] for i, p in enumerate(params) if any(p is q for q in upd.optimizer.projected_backward_params())
    }
    for s in range(2):  # step 0 refreshes (ordinary norm), step 1 is projected
        for opt in (upd.optimizer, ref_opt):
            for g in opt.param_groups:
                g["lr"] = lr_at(s)
        loss_of(model, batch(s)).backward()
        loss_of(ref, batch(s)).backward()
        sq = 0.0
        for name, p in ref.named_parameters():
            assert p.grad is not None
            g = p.grad.double()
            if s == 1 and name in low_names:
                g = project(g, {k: v.double() for k, v in ref_opt.state[p].items() if k in ("proj_left", "proj_right")})
            sq += float(g.pow(2).sum())
        expected = sq**0.5
        norm = upd.finish_backward()
        assert abs(float(norm) - expected) < 1e-5 * expected
        assert upd.optimizer.projected_grads == 0  # counted when the step consumes them
        coef = min(1.0, max_norm / (expected + 1e-6))
        assert coef < 0.5  # clipping is active at this max_norm
        for p in ref.parameters():
            assert p.grad is not None
            p.grad.mul_(coef)
        upd.commit()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        assert upd.optimizer.projected_grads == (8 if s == 1 else 0)
        assert all(p.grad is None for p in params)
    # fp32 rounding: the reference's clip coefficient comes from a float64 norm, the trainer's from an fp32 one, and
    # the CPU's matmul kernels round differently from machine to machine (3.7e-6 on an AMD EPYC, < 1e-6 elsewhere).
    assert max_diff(model, ref) < 1e-5


def test_a_projected_gradient_on_a_refresh_step_is_an_error():
    model = tiny_model()
    opt: Any = optimizer_spec(model, galore_config("galore_adamw", projected_backward=True)).build()
    w = opt.projected_backward_params()[0]
    assert opt.projection_for(w) is None  # no basis yet: the first step refreshes
    opt.grad_carrier(w).grad = torch.zeros(opt.grad_carrier(w).shape)
    with pytest.raises(RuntimeError, match="refreshes the projector"):
        opt.step()


def _projected_opt_after_one_step() -> tuple[Any, nn.Parameter]:
    """A GaLore optimizer with the projected backward's groups after one ordinary step (bases exist, no refresh due)."""
    model = tiny_model()
    opt: Any = optimizer_spec(model, galore_config("galore_adamw", projected_backward=True)).build()
    loss_of(model, batch(0)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    w = opt.projected_backward_params()[0]
    assert opt.projection_for(w) is not None  # the next step projects: a projected gradient is expected
    return opt, w


def test_a_full_and_a_projected_gradient_in_one_step_is_an_error() -> None:
    opt, w = _projected_opt_after_one_step()
    carrier = opt.grad_carrier(w)
    carrier.grad = torch.ones(carrier.shape)
    w.grad = torch.ones_like(w)
    with pytest.raises(RuntimeError, match="both a full gradient and a projected one"):
        opt.step()


def test_the_step_frees_the_projected_gradient_it_consumed() -> None:
    opt, w = _projected_opt_after_one_step()
    carrier = opt.grad_carrier(w)
    carrier.grad = torch.ones(carrier.shape)
    before = w.detach().clone()
    opt.step()
    assert carrier.grad is None and opt.projected_grads == 1
    assert not torch.equal(w.detach(), before)
    after = w.detach().clone()
    opt.step()  # no new gradient: nothing to consume, w untouched
    assert opt.projected_grads == 0 and torch.equal(w.detach(), after)


def test_zero_grad_without_set_to_none_zeroes_the_carriers() -> None:
    opt, w = _projected_opt_after_one_step()
    carrier = opt.grad_carrier(w)
    carrier.grad = torch.ones(carrier.shape)
    opt.zero_grad(set_to_none=False)
    assert carrier.grad is not None and carrier.grad.shape == carrier.shape
    assert not carrier.grad.any()
    opt.zero_grad(set_to_none=True)
    assert carrier.grad is None


def test_only_the_matrices_of_a_projected_group_get_carriers() -> None:
    w, b = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6))
    opt = GaLoreAdamW([{"params": [w, b], "rank": 2, "projected_backward": True}])
    assert [p is w for p in opt.projected_backward_params()] == [True]
    assert opt.projection_for(b) is None
    with pytest.raises(ValueError, match="not in a low-rank group with projected_backward=True"):
        opt.grad_carrier(b)


def test_the_carrier_of_a_bf16_weight_is_fp32_with_the_projected_shape() -> None:
    w = nn.Parameter(torch.randn(8, 6, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "projected_backward": True}])
    carrier = opt.grad_carrier(w)
    assert carrier.dtype == torch.float32 and carrier.shape == (8, 2)  # std, m >= n: R = G Q^T, (m, r)
    assert carrier.requires_grad and carrier.is_leaf


def test_the_carrier_has_min_rank_m_n_columns_when_the_rank_exceeds_the_weight() -> None:
    """rank 8 on an 8 x 6 weight: the SVD basis has 6 vectors, so R = G Q^T is 8 x 6 (not 8 x 8), and a projected
    step after the first refresh runs with it."""
    w = nn.Parameter(torch.randn(8, 6))
    opt = GaLoreAdamW([{"params": [w], "rank": 8, "update_proj_gap": 4, "projected_backward": True}])
    assert opt.grad_carrier(w).shape == (8, 6)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    w.grad = torch.randn(8, 6)
    opt.step()  # the refresh: Q is 6 x 6
    bases = opt.projection_for(w)
    assert bases is not None and bases["proj_right"].shape == (6, 6)
    projected_linear(x, w, opt.grad_carrier(w), bases).sum().backward()
    torch.testing.assert_close(opt.grad_carrier(w).grad, torch.ones(5, 8).T @ x @ bases["proj_right"].T)


def test_install_needs_a_galore_optimizer_and_leaves_parameters_and_state_dict_alone():
    model = tiny_model()
    adamw = optimizer_spec(model, OptimConfig(name="adamw")).build()
    with pytest.raises(TypeError, match="GaLore"):
        install_projected_backward(model, adamw)
    before = {k: v for k, v in model.state_dict().items()}
    params = list(model.parameters())
    opt = optimizer_spec(model, galore_config("galore_adamw", projected_backward=True, lowrank_targets="all")).build()
    handle = install_projected_backward(model, opt)
    assert handle.skipped == ["embed.weight"]  # not an nn.Linear: keeps the ordinary backward
    assert "lm_head" in handle.installed
    assert list(model.parameters()) == params and model.state_dict().keys() == before.keys()
    handle.remove()
    assert "forward" not in model.lm_head.__dict__


def biased_layer_after_its_refresh() -> tuple[nn.Linear, GaLoreAdamW, torch.Tensor]:
    """A biased nn.Linear with the projected backward installed, after its refresh step (an ordinary backward):
    its next forward with a graph is projected."""
    layer = nn.Linear(6, 8, bias=True)
    opt = GaLoreAdamW([{"params": [layer.weight], "rank": 2, "update_proj_gap": 4, "projected_backward": True}])
    install_projected_backward(layer, opt)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    layer(x).sum().backward()
    opt.step()
    assert opt.projection_for(layer.weight) is not None
    return layer, opt, x


def test_a_projected_linear_with_a_bias_adds_it() -> None:
    layer, opt, x = biased_layer_after_its_refresh()
    torch.testing.assert_close(layer(x), x @ layer.weight.detach().T + layer.bias.detach())


def test_evaluation_without_grad_is_the_ordinary_linear_under_autocast() -> None:
    """No graph (torch.no_grad, as in evaluation): the layer is nn.Linear's own F.linear even on a step that
    would project, so under bf16 autocast its output is autocast's bf16 linear with the bias inside it."""
    layer, opt, x = biased_layer_after_its_refresh()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        want = F.linear(x, layer.weight, layer.bias)
    assert want.dtype == torch.bfloat16
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_under_autocast_the_projected_linear_computes_like_autocasts_linear() -> None:
    """bf16 autocast, fp32 input and weight: the forward is autocast's bf16 linear (same values, bf16 out, as
    nn.Linear would give), the input gradient comes back fp32 and R accumulates in fp32."""
    m, n, r = 8, 6, 2
    g = torch.Generator().manual_seed(0)
    w = torch.randn(m, n, generator=g)
    x = torch.randn(5, n, generator=g, requires_grad=True)
    carrier = torch.zeros(()).expand(m, r).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = projected_linear(x, w, carrier, bases_for("right", m, n, r))
        want = F.linear(x.detach(), w)
    assert want.dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert carrier.grad is not None and carrier.grad.dtype == torch.float32


def test_a_projected_linear_with_a_bias_keeps_autocasts_dtype() -> None:
    """Under bf16 autocast nn.Linear's output is bf16, bias included; the projected forward's must be too (an fp32
    bias added to the bf16 product would promote it to fp32), and the bias still gets its fp32 gradient."""
    layer, opt, x = biased_layer_after_its_refresh()
    layer.bias.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        want = F.linear(x, layer.weight.detach(), layer.bias.detach())
    assert want.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)  # the bias added after rounding, not in the GEMM
    got.float().sum().backward()
    assert layer.bias.grad is not None and layer.bias.grad.dtype == torch.float32
    torch.testing.assert_close(layer.bias.grad, torch.full((8,), 5.0))


def test_removing_the_projected_backward_twice_is_harmless() -> None:
    layer = nn.Linear(6, 8)
    opt = GaLoreAdamW([{"params": [layer.weight], "rank": 2, "projected_backward": True}])
    handle = install_projected_backward(layer, opt)
    assert handle.installed == [""] and "forward" in layer.__dict__
    handle.remove()
    handle.remove()
    assert "forward" not in layer.__dict__
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_refusals_when_the_config_loads():
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(None, ["--optim.name=galore_adamw", "--optim.projected_backward=true", "--train.compile=true"])
    cfg = load_config(None, ["--optim.name=galore_adamw", "--optim.projected_backward=true"])
    validate(cfg, world_size=8)  # DDP (the default engine) averages the projected gradients
    fsdp2 = load_config(None, ["--optim.name=galore_adamw", "--optim.projected_backward=true", "--train.engine=fsdp2"])
    validate(fsdp2, world_size=1)  # one process: fsdp2 is not applied
    with pytest.raises(
        ConfigError,
        match=r"^optim\.projected_backward=true is not supported with train\.engine=fsdp2 on 2 ranks: .* shards the "
        r"weights it projects\. Use --train\.engine=ddp or --optim\.projected_backward=false$",
    ):
        validate(fsdp2, world_size=2)
    flags = ["--optim.name=galore_adamw", "--optim.projected_backward=true", "--train.fused_update=true"]
    fused = load_config(None, [*flags, "--train.max_grad_norm=0"])
    validate(fused, world_size=1)
    with pytest.raises(
        ConfigError, match=r"with train\.fused_update=true on 2 ranks: .* Use --train\.fused_update=false"
    ):
        validate(fused, world_size=2)
    with pytest.raises(ConfigError, match="optim.projected_backward=True is not read by adamw"):
        load_config(None, ["--optim.projected_backward=true"])


def test_the_compile_refusal_names_the_settings_that_fix_it() -> None:
    with pytest.raises(ValueError, match="Set --train.compile=false or --optim.projected_backward=false"):
        check_projected_backward_supported(world_size=1, compile=True, engine="ddp", fused=False)
    check_projected_backward_supported(world_size=1, compile=False, engine="ddp", fused=False)


PROJECTED_RUN = {
    "optim.name": "galore_adamw",
    "optim.projected_backward": "true",
    "optim.rank": 8,
    "optim.update_proj_gap": 2,
}


def test_training_resumes_bit_exact_and_logs_what_the_norm_is(tmp_path, sample_tokens):
    run(tmp_path, sample_tokens, "straight", **PROJECTED_RUN)
    run(tmp_path, sample_tokens, "resumed", **PROJECTED_RUN)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints" / "step_00000006.pt").unlink()  # as if it died right after step 3's save
    _, result = run(tmp_path, sample_tokens, "resumed", **PROJECTED_RUN)
    assert result.final_step == 6
    a, b = losses(tmp_path / "straight"), losses(resumed)
    assert sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in a), (a, b)
    final_a = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_00000006.pt")
    final_b = ckpt.load_checkpoint(resumed / "checkpoints" / "step_00000006.pt")
    for name, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][name]), name
    # Refresh steps (1, 3, 5: the state's step 0, 2, 4) consume G; the others R, for the 8 block weights.
    gauge = {
        r["step"]: r["optim/projected_grads"]
        for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")
        if "optim/projected_grads" in r
    }
    assert gauge == {1: 0, 2: 8, 3: 0, 4: 8, 5: 0, 6: 8}


@pytest.mark.parametrize(("targets", "outside"), [("blocks", []), ("all", ["lm_head.weight"])], ids=["blocks", "all"])
def test_the_weights_left_out_of_ddp_are_the_linears_the_projected_backward_switches(
    targets: str, outside: list[str]
) -> None:
    """Named before the optimizer exists (DDP wraps the model first): exactly the modules install_projected_backward
    switches later; the embedding of lowrank_targets=all is no nn.Linear and stays with DDP."""
    model = tiny_model()
    cfg = galore_config("galore_adamw", projected_backward=True, lowrank_targets=targets)
    names = projected_linear_weight_names(model, optimizer_spec(model, cfg).param_groups)
    handle = install_projected_backward(model, optimizer_spec(model, cfg).build())
    assert names == [f"{m}.weight" for m in handle.installed]
    blocks = [n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    assert names == blocks + outside and "embed.weight" not in names
    assert projected_linear_weight_names(model, optimizer_spec(model, galore_config("galore_adamw")).param_groups) == []


def test_two_ddp_ranks_train_like_one_process(tmp_path, sample_tokens):
    """The paper's GaLore configs run projected under torchrun: 2 gloo ranks under DDP (each half of every global
    batch, 2 micro-batches each, clipping on) give one process's losses and weights to summation-order rounding,
    and the gauge shows the projected gradients were used (averaged over the ranks, or the ranks would drift apart
    and from the one-process run)."""
    extra: dict[str, Any] = {**PROJECTED_RUN, "train.micro_batch": 1, "checkpoint.interval": 6}
    store = str(tmp_path / "store")
    run_ranks(train_jobs_as_rank, 2, [(store, tiny_overrides(tmp_path / "two", sample_tokens, **extra))])
    run(tmp_path, sample_tokens, "one", **extra)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    records = read_metrics(tmp_path / "two" / "metrics.jsonl")
    gauge = {r["step"]: r["optim/projected_grads"] for r in records if "optim/projected_grads" in r}
    assert gauge == {1: 0, 2: 8, 3: 0, 4: 8, 5: 0, 6: 8}
    a = ckpt.load_checkpoint(tmp_path / "one" / "checkpoints" / "step_00000006.pt")["model"]
    b = final_model(tmp_path / "two", 6)
    assert sorted(a) == sorted(b)
    # Per tensor (as tests/e2e/test_distributed_run.py, which says why): AdamW's m / (sqrt(v) + eps) turns the
    # summation-order noise of a rare token's near-zero embedding gradient into an update difference of up to lr.
    assert max_rel_difference(b, a) < 5e-5


def test_benchmark_tool_counts_the_closed_form_at_a_tiny_size():
    out = subprocess.run(
        [sys.executable, "tools/bench_projected_backward.py", "--width", "32", "--mlp", "64", "--batch", "2"]
        + ["--seq", "4", "--ranks", "4", "8", "--repeats", "1", "--threads", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 4 ") or line.startswith("| 8 ")]
    assert len(rows) == 2 and all(" = " in row and "!=" not in row for row in rows)


def test_benchmark_tool_prints_each_figure_in_its_column(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """tools/bench_projected_backward.py's row from bench_rank's figures: GFLOP (1e9), ms, projected / AdamW step;
    a FLOP count off the closed form at any rank (not only the last) fails the run; --threads is applied."""
    figures = {
        "flops_GaLore": 6e9, "closed_GaLore": 6e9, "flops_projected": 2e9, "closed_projected": 2e9,
        "fb_AdamW": 0.5, "fb_GaLore": 0.040, "fb_projected": 0.025,
        "step_AdamW": 0.050, "step_GaLore": 0.080, "step_projected": 0.060,
    }  # fmt: skip

    def fake_rank(args: argparse.Namespace, rank: int) -> dict[str, float]:
        return figures if rank == 8 else {**figures, "flops_projected": 3e9}

    threads: list[int] = []
    monkeypatch.setattr(bench_pb, "bench_rank", fake_rank)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert bench_pb.main(["--ranks", "8", "--threads", "3"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 8 |"))
    assert row == "| 8 | 6.00 = 6.00 | 2.00 = 2.00 | 40 | 25 | 50 | 80 | 60 | 1.20 |"
    assert threads == [3]
    assert bench_pb.main(["--ranks", "4", "8"]) == 1
    assert "| 4 | 6.00 = 6.00 | 3.00 != 2.00 |" in capsys.readouterr().out


def test_benchmark_tool_times_leave_out_the_warm_up_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_rank's medians are over `repeats` rounds after one untimed warm-up round."""
    calls: list[int] = []

    def fake_timed(fn: Callable[[], None]) -> float:
        fn()
        calls.append(1)
        return 100.0 if len(calls) <= 3 * 2 * 4 else 1.0  # round 0: 3 paths x (fwd+bwd, step) x 4 weights

    monkeypatch.setattr(bench_pb, "timed", fake_timed)
    args = argparse.Namespace(width=4, mlp=8, batch=1, seq=2, repeats=1, proj_type="std")
    r = bench_pb.bench_rank(args, 2)
    assert len(calls) == 2 * 3 * 2 * 4
    assert [r[f"{kind}_{path}"] for kind in ("fb", "step") for path in bench_pb.PATHS] == [4.0] * 6
