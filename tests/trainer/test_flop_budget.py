"""trainer/flop_budget.py: training FLOPs (projected backward, adapters), max_steps from a FLOP budget.

References are independent of the module: shapes written out by hand, and torch's FlopCounterMode
on a plain linear layer's forward + backward with the weight gradient computed as the projected
products (AdaMeM paper, Appendix B) or through a LoRA adapter."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, flops_per_token
from optim import OptimConfig
from tests.helpers.runs import tiny_overrides
from trainer.config import ConfigError, load_config, save_config
from trainer.flop_budget import config_flops, float_at_least, meta_transformer, resolve_max_steps, training_flops
from trainer.metrics import read_metrics
from trainer.resume_policy import may_change
from trainer.trainer import train

D, L, SEQ, V, BATCH = 64, 2, 32, 32128, 4  # the model and batch of tests/helpers/runs.py tiny_overrides
TOKENS = BATCH * SEQ
# (out, in) of every 2-D weight inside one block: fused qkv, attention out, MLP up, MLP down.
BLOCK_SHAPES = [(3 * D, D), (D, D), (4 * D, D), (D, 4 * D)]
OUTPUT_SHAPE = (V, D)

SMALL = [
    f"--model.d_model={D}",
    f"--model.n_layers={L}",
    f"--model.max_seq_len={SEQ}",
    f"--data.seq_len={SEQ}",
    f"--train.global_batch={BATCH}",
    f"--train.micro_batch={BATCH}",
]


def galore(rank: int, gap: int, targets: str = "blocks", projected: bool = True) -> list[str]:
    return [
        "--optim.name=galore_adamw",
        f"--optim.rank={rank}",
        f"--optim.update_proj_gap={gap}",
        f"--optim.lowrank_targets={targets}",
        f"--optim.projected_backward={str(projected).lower()}",
    ]


def full_per_token() -> int:
    """6 x non-embedding params + 12 L d T + 6 d V, the parameters counted from the shapes."""
    non_embedding = L * (sum(m * n for m, n in BLOCK_SHAPES) + 2 * D) + D  # matrices, 2 LayerNorms; final norm
    return 6 * non_embedding + 12 * L * D * SEQ + 6 * D * V


def projected_change(shapes: list[tuple[int, int]], rank: int, both_sides: bool = False) -> int:
    """Per token: each weight's gradient matmul 2mn becomes 2r(m+n) (+ 2r^2 when both sides are projected)."""
    total = 0
    for m, n in shapes:
        r = min(rank, m, n)
        total += 2 * r * (m + n) + (2 * r * r if both_sides else 0) - 2 * m * n
    return total


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def linear_flops(m: int, n: int, z: int, *, rank: int | None = None, side: str = "right") -> int:
    """FlopCounterMode's count of a linear layer's forward + backward on z tokens: ordinary (rank None), or with
    the weight gradient formed as the projected products, never as G = g^T x (Appendix B)."""
    x = torch.randn(z, n, requires_grad=True)
    w = torch.randn(m, n, requires_grad=rank is None)
    g = torch.randn(z, m)

    def step() -> None:
        y = F.linear(x, w)
        if rank is None:
            torch.autograd.grad(y, (x, w), g)
            return
        torch.autograd.grad(y, x, g)  # input gradient only
        p, q = torch.randn(m, rank), torch.randn(n, rank)
        if side == "left":  # P^T G = (P^T g^T) x
            (p.T @ g.T) @ x.detach()
        elif side == "right":  # G Q = g^T (x Q)
            g.T @ (x.detach() @ q)
        else:  # P^T G Q = (P^T g^T)(x Q)
            (p.T @ g.T) @ (x.detach() @ q)

    return counted(step)


def lora_linear_flops(m: int, n: int, z: int, r: int) -> int:
    """FlopCounterMode's count of a LoRA linear (frozen W, trainable A (r x n), B (m x r)), forward + backward."""
    x = torch.randn(z, n, requires_grad=True)
    w, a, b = torch.randn(m, n), torch.randn(r, n, requires_grad=True), torch.randn(m, r, requires_grad=True)
    return counted(
        lambda: torch.autograd.grad(F.linear(x, w) + F.linear(F.linear(x, a), b), (x, a, b), torch.ones(z, m))
    )


# ----- the FLOP model --------------------------------------------------------------------------------


def test_ordinary_count_is_the_model_count_for_every_optimizer():
    cfg = load_config(None, SMALL)
    assert flops_per_token(cfg.model, SEQ) == full_per_token()
    for optim in (["adamw"], ["adafactor"], ["adamem", "--optim.rank=8"], ["adalomo"]):
        flops = config_flops(load_config(None, [*SMALL, f"--optim.name={optim[0]}", *optim[1:]]))
        assert (flops.per_token, flops.per_token_refresh, flops.refresh_interval) == (full_per_token(),) * 2 + (None,)
    plain_galore = config_flops(load_config(None, [*SMALL, *galore(8, 3, projected=False)]))
    assert plain_galore.per_token == full_per_token() and plain_galore.refresh_interval is None


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_projected_weight_gradient_matches_flop_counter_of_a_linear_layer(side):
    z, rank = 4, 8
    by_counter = sum(linear_flops(m, n, z, rank=rank, side=side) - linear_flops(m, n, z) for m, n in BLOCK_SHAPES) // z
    flops = config_flops(load_config(None, [*SMALL, *galore(rank, 3), f"--optim.proj_type={side}"]))
    assert flops.per_token - flops.per_token_refresh == L * by_counter
    assert by_counter == projected_change(BLOCK_SHAPES, rank, both_sides=side == "full")
    assert flops.per_token_refresh == full_per_token() and flops.refresh_interval == 3


def test_lowrank_targets_all_projects_the_output_layer_but_not_the_embedding_lookup():
    flops = config_flops(load_config(None, [*SMALL, *galore(8, 3, targets="all")]))
    expected = L * projected_change(BLOCK_SHAPES, 8) + projected_change([OUTPUT_SHAPE], 8)
    assert flops.per_token == full_per_token() + expected


def test_rank_is_capped_at_the_smaller_side():
    # rank 64 = d_model: every block weight has min(m, n) = 64, so r = 64 everywhere (even for 64 x 64).
    flops = config_flops(load_config(None, [*SMALL, *galore(64, 3)]))
    assert flops.per_token == full_per_token() + L * projected_change(BLOCK_SHAPES, 64)
    assert flops.per_token > full_per_token()  # a full-rank projection costs more than the plain gradient


def test_lora_adapters_match_flop_counter_of_a_lora_linear():
    z, r = 4, 8
    by_counter = sum(lora_linear_flops(m, n, z, r) - linear_flops(m, n, z) for m, n in BLOCK_SHAPES) // z
    assert by_counter == sum(6 * r * (m + n) - 2 * m * n for m, n in BLOCK_SHAPES)
    cfg = load_config(None, SMALL)
    for method in ("lora", "relora"):
        flops = training_flops(
            cfg.model, cfg.optim, seq_len=SEQ, global_batch=BATCH, adapter_method=method, adapter_rank=r
        )
        assert flops.per_token == flops.per_token_refresh == full_per_token() + L * by_counter


def test_cumulative_flops_count_refresh_steps_at_full_cost():
    flops = config_flops(load_config(None, [*SMALL, *galore(8, 3)]))
    full, projected = TOKENS * full_per_token(), TOKENS * (full_per_token() + L * projected_change(BLOCK_SHAPES, 8))
    total = 0
    for step in range(10):  # refresh at steps 0, 3, 6, 9
        assert flops.cumulative(step) == total
        total += full if step % 3 == 0 else projected
    assert flops.cumulative(10) == total == 4 * full + 6 * projected


# ----- max_steps from a budget -----------------------------------------------------------------------


def test_budget_on_a_step_boundary_and_one_flop_short():
    full, projected = TOKENS * full_per_token(), TOKENS * (full_per_token() + L * projected_change(BLOCK_SHAPES, 8))
    seven = 3 * full + 4 * projected  # steps 0..6; refreshes at 0, 3, 6
    assert seven < 2**53  # exact as a float
    for budget, steps in ((seven, 7), (seven - 1, 6), (seven + projected - 1, 7), (seven + projected, 8)):
        cfg = load_config(None, [*SMALL, *galore(8, 3), f"--train.flop_budget={budget}"])
        assert cfg.train.max_steps == steps, budget
        assert cfg.train.flop_budget == budget


def test_match_flops_of_adamw():
    base = ["configs/210m.yaml", "--train.match_flops_of=adamw"]
    adamw = load_config(base[0], base[1:])
    # 8000 steps of 1024 x 512 tokens x 1,179,015,168 FLOPs exceeds 2^53: the budget is rounded up, not down.
    budget = adamw.train.flop_budget
    assert adamw.train.max_steps == 8000 and budget is not None and budget >= 8000 * 1024 * 512 * 1_179_015_168
    plain = load_config(base[0], [*base[1:], "--optim.name=galore_adamw", "--optim.rank=128"])
    assert plain.train.max_steps == 8000
    proj = load_config(base[0], [*base[1:], *galore(128, 200)])
    # By hand: per block qkv 3072x1024, out 1024x1024, up 4096x1024, down 1024x4096, r = 128.
    shapes = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]
    full = 1_179_015_168
    proj_per_token = full + 12 * projected_change(shapes, 128)
    assert proj_per_token == 927_356_928  # the number of the old hand-computed comment
    steps = proj.train.max_steps
    spent = [s * proj_per_token + math.ceil(s / 200) * (full - proj_per_token) for s in (steps, steps + 1)]
    assert spent[0] <= 8000 * full < spent[1]
    assert steps == 10157 < 10171  # 10171 ignored the 51 full-cost refresh steps
    assert proj.train.flop_budget == adamw.train.flop_budget


def test_paper_galore_configs_are_flop_matched_to_adamw():
    cfg = load_config("configs/paper/210m_galore_r128.yaml")
    assert cfg.optim.projected_backward and cfg.train.match_flops_of == "adamw"
    assert cfg.train.max_steps == 10157
    assert load_config("configs/paper/210m_galore_r128.yaml", ["--optim.rank=512"]).train.max_steps == 8742


def test_resolution_is_idempotent_through_the_saved_config(tmp_path):
    cfg = load_config("configs/paper/210m_galore_r64_all.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.train.max_steps == 11197
    described = resolve_max_steps(again)
    assert again == cfg and described is not None
    assert described.describe() == (
        f"max_steps 11,197 from flop_budget {cfg.train.flop_budget:.4g} (FLOP-matched to adamw at 8,000 steps)"
    )


def test_a_set_budget_wins_over_match_flops_of_and_max_steps():
    budget = 1e15
    cfg = load_config(
        None, [*SMALL, "--train.match_flops_of=adamw", f"--train.flop_budget={budget}", "--train.max_steps=3"]
    )
    assert cfg.train.max_steps == int(budget // (TOKENS * full_per_token())) and cfg.train.flop_budget == budget


def test_match_flops_of_keeps_max_steps_when_the_budget_is_no_float():
    steps = 10**12 + 9  # steps x 128 tokens x 1,661,190,144 FLOPs has more than 53 significant bits
    exact = steps * TOKENS * full_per_token()
    assert float(exact) < exact  # rounded to nearest, the budget would lose the last step
    cfg = load_config(None, [*SMALL, "--train.match_flops_of=adamw", f"--train.max_steps={steps}"])
    assert cfg.train.max_steps == steps and cfg.train.flop_budget == math.nextafter(float(exact), math.inf)


def test_float_at_least():
    big = 2**60 + 1
    assert float_at_least(big) >= big and float_at_least(big) == math.nextafter(float(2**60), math.inf)
    assert float_at_least(7) == 7.0


def test_no_budget_leaves_the_config_alone():
    cfg = load_config(None, [*SMALL, "--train.max_steps=123"])
    assert resolve_max_steps(cfg) is None and cfg.train.max_steps == 123 and cfg.train.flop_budget is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["--train.match_flops_of=adamv"],
            r"train.match_flops_of='adamv' is not a registered optimizer. Did you mean 'adamw'",
        ),
        (["--train.flop_budget=0"], r"train.flop_budget=0.0 must be a positive number"),
        (["--train.flop_budget=-1e18"], r"must be a positive number"),
        (["--train.flop_budget=.inf"], r"must be a positive number"),
        (["--train.flop_budget=1e6"], r"train.flop_budget=1e\+06 is less than one step"),
        (["--train.match_flops_of=adamw", "--train.max_steps=0"], r"train.max_steps=0 must be positive"),
        (["--train.flop_budget=lots"], r"train.flop_budget: expected a number"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*SMALL, *overrides])


def test_a_resume_may_change_the_budget():
    assert may_change("train.flop_budget") and may_change("train.match_flops_of")


def test_550m_projected_per_token_matches_the_old_hand_count():
    flops = training_flops(
        ModelConfig.from_flavor("550m"),
        OptimConfig(name="galore_adamw", rank=160, projected_backward=True),
        seq_len=512,
        global_batch=1024,
    )
    assert flops.per_token == 2_480_586_240  # the old hand-computed comment of configs/paper/550m_galore_r160.yaml
    assert flops.per_token_refresh == 3_267_018_240 and flops.refresh_interval == 200


# ----- the trainer -----------------------------------------------------------------------------------


def test_trainer_derives_max_steps_and_logs_flops_seen_exactly_per_step(tmp_path, sample_tokens, capsys):
    rank, gap = 8, 3
    settings = {
        "optim.name": "galore_adamw",
        "optim.rank": rank,
        "optim.update_proj_gap": gap,
        "optim.lowrank_targets": "all",
        "optim.projected_backward": True,
        "train.match_flops_of": "adamw",
        "train.max_steps": 6,
        "eval.interval": 0,
        "log.tensorboard": False,
    }
    full = TOKENS * full_per_token()
    projected = TOKENS * (
        full_per_token() + L * projected_change(BLOCK_SHAPES, rank) + projected_change([OUTPUT_SHAPE], rank)
    )

    def spent(steps: int) -> int:
        return steps * projected + math.ceil(steps / gap) * (full - projected)

    loaded = load_config("configs/tiny.yaml", tiny_overrides(tmp_path / "run", sample_tokens, **settings))
    # FLOP-matched to adamw's 6 steps: the largest S whose FLOPs fit in 6 full steps.
    assert spent(7) <= 6 * full < spent(8) and loaded.train.max_steps == 7
    # A Config built in code (not through load_config) is resolved by the trainer the same way.
    cfg = dataclasses.replace(loaded, train=dataclasses.replace(loaded.train, flop_budget=None, max_steps=6))
    result = train(cfg)
    assert cfg == loaded and result.final_step == 7
    out = capsys.readouterr().out
    assert f"max_steps 7 from flop_budget {loaded.train.flop_budget:.4g} (FLOP-matched to adamw at 6 steps)" in out
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "flops_seen" in r]
    assert [r["step"] for r in records] == list(range(1, 8))
    previous = 0.0
    for r in records:
        step = r["step"] - 1  # the 0-based step just done: a refresh (full gradient) when step % gap == 0
        assert r["flops_seen"] - previous == (full if step % gap == 0 else projected), r
        assert r["flops_seen"] == spent(r["step"]) and r["tokens_seen"] == r["step"] * TOKENS
        previous = r["flops_seen"]
    assert load_config(tmp_path / "run" / "config.yaml") == loaded
    # Run again: complete, and the advice names the budget (a raised --train.max_steps would be replaced).
    assert train(loaded).final_step == 7
    out = capsys.readouterr().out
    assert "run already complete at step 7 (train.flop_budget=" in out and "raise --train.flop_budget" in out


def test_the_meta_model_is_built_once_per_model_config():
    """Validating a sweep counts the FLOPs of hundreds of runs of a few models: each model is built once."""
    a = meta_transformer(ModelConfig(d_model=64, n_layers=2))
    assert meta_transformer(ModelConfig(d_model=64, n_layers=2)) is a
    other = meta_transformer(ModelConfig(d_model=64, n_layers=3))
    assert other is not a and len(other.blocks) == 3
    assert next(a.parameters()).device.type == "meta"


def test_step_flops_charges_the_full_gradient_on_refresh_steps_only():
    flops = config_flops(load_config(None, [*SMALL, *galore(8, 3)]))
    full, projected = TOKENS * full_per_token(), TOKENS * (full_per_token() + L * projected_change(BLOCK_SHAPES, 8))
    assert projected < full
    # Refreshes (the full gradient formed for the SVD) at 0-based steps 0, 3, 6: the first step included.
    assert [flops.step_flops(s) for s in range(7)] == [full, projected, projected] * 2 + [full]
    assert [flops.is_refresh(s) for s in range(4)] == [True, False, False, True]


def test_rank_above_the_smaller_side_counts_as_full_rank():
    # The config rejects rank > d_model; training_flops itself still caps r = min(rank, m, n) = 64 = D.
    cfg = load_config(None, SMALL)
    flops = training_flops(
        cfg.model,
        OptimConfig(name="galore_adamw", rank=2 * D, update_proj_gap=3, projected_backward=True),
        seq_len=SEQ,
        global_batch=BATCH,
    )
    assert flops.per_token == full_per_token() + L * projected_change(BLOCK_SHAPES, D)


def test_match_flops_of_the_projected_optimizer_itself_uses_its_ordinary_backward():
    # match_flops_of=galore_adamw from a projected-backward galore run: the reference is galore_adamw with the
    # ordinary backward (F_full every step), not this run's cheaper projected steps.
    cfg = load_config(None, [*SMALL, *galore(8, 3), "--train.match_flops_of=galore_adamw", "--train.max_steps=6"])
    assert cfg.train.flop_budget == 6 * TOKENS * full_per_token()
    full, projected = TOKENS * full_per_token(), TOKENS * (full_per_token() + L * projected_change(BLOCK_SHAPES, 8))

    def spent(steps: int) -> int:
        return steps * projected + math.ceil(steps / 3) * (full - projected)

    steps = cfg.train.max_steps
    assert spent(steps) <= 6 * full < spent(steps + 1)
