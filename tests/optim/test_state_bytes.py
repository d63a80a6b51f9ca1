"""Every registered optimizer: trains the tiny model, resumes bit for bit through
torch.save/torch.load(weights_only=True), per-parameter optimizers (the fused in-backward path)
match the single optimizer, and measured state bytes equal the closed-form formulas."""

from __future__ import annotations

import io

import pytest
import torch

from model import ModelConfig, Transformer
from optim import REGISTRY, OptimConfig
from optim.adafactor import Adafactor
from optim.param_groups import group_options
from optim.state_bytes import (
    format_state_bytes_table,
    formula_state_bytes,
    measured_state_bytes,
    state_bytes_per_rank,
    state_bytes_table,
)
from tests.helpers.tiny_lm import loss_of

NAMES = ["adamw", "adafactor", "adafactor_momentum", "galore_adamw", "galore_adafactor", "adamem"]


def _cfg(name: str, **kw) -> OptimConfig:
    if name == "adafactor_momentum":
        return OptimConfig(name="adafactor", beta1=0.9, **kw)
    if name == "adafactor":
        kw.setdefault("beta1", None)
    return OptimConfig(name=name, **kw)


def _small_model(seed=0, vocab=128, d=64, layers=2):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(d_model=d, n_layers=layers, vocab_size=vocab, max_seq_len=32))


def _tokens(vocab, seed=0, batch=4, seq=16):
    return torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))


def _train(model, opt, steps, vocab, seed0=0):
    losses = []
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, _tokens(vocab, seed0 + i))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", NAMES)
def test_trains_tiny_model(name):
    """The tiny flavour (d 128, 4 layers) with a 1024-token vocabulary, overfitting one batch."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_flavor("tiny", vocab_size=1024, max_seq_len=64))
    cfg = _cfg(name, lr=3e-3, rank=32, update_proj_gap=4)
    opt = REGISTRY[cfg.name](model, cfg).build()
    tokens = _tokens(1024, seed=0, batch=4, seq=32)
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, tokens)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("name", NAMES + ["adamem_variant1", "adamem_variant2", "galore_full_rotate"])
def test_exact_resume(name):
    extra = {}
    if name.startswith("adamem_"):
        name, extra = "adamem", dict(variant=name.split("_")[1])
    if name == "galore_full_rotate":
        name, extra = "galore_adamw", dict(proj_type="full", moments_on_proj_change="rotate")
    cfg = _cfg(name, lr=1e-2, rank=8, update_proj_gap=2, lowrank_targets="all", **extra)
    model = _small_model()
    opt = REGISTRY[cfg.name](model, cfg).build()
    _train(model, opt, 3, 128)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = _small_model(seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2 = REGISTRY[cfg.name](model2, cfg).build()
    opt2.load_state_dict(ckpt["optim"])
    _train(model, opt, 3, 128, seed0=10)  # includes a projector refresh (steps 5)
    _train(model2, opt2, 3, 128, seed0=10)
    for (n, a), b in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", NAMES)
def test_per_parameter_optimizers_match_single(name):
    """The in-backward path builds one optimizer per parameter from the same spec."""
    cfg = _cfg(name, lr=1e-2, rank=8, update_proj_gap=2)
    m1, m2 = _small_model(), _small_model()
    single = REGISTRY[cfg.name](m1, cfg).build()
    spec = REGISTRY[cfg.name](m2, cfg)
    per = []
    for group in spec.param_groups:
        options = group_options(group)
        for n, p in zip(group["names"], group["params"], strict=True):
            per.append(spec.cls([{**options, "params": [p], "names": [n]}], **spec.kwargs))

    class Multi:
        def zero_grad(self, set_to_none=True):
            for o in per:
                o.zero_grad(set_to_none=set_to_none)

        def step(self):
            for o in per:
                o.step()

    _train(m1, single, 3, 128)
    _train(m2, Multi(), 3, 128)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize(
    "name",
    NAMES
    + [
        "adamem_variant1",
        "adamem_variant2",
        "galore_reverse_std",
        "galore_adafactor_full",
        "adafactor_one_sided",
        "adalomo",
        "adalomo_svd4",
    ],
)
@pytest.mark.parametrize("targets", ["blocks", "all"])
def test_measured_state_bytes_match_formula(name, targets):
    extra = {}
    if name.startswith("adamem_"):
        name, extra = "adamem", dict(variant=name.split("_")[1])
    elif name == "galore_reverse_std":
        name, extra = "galore_adamw", dict(proj_type="reverse_std")
    elif name == "galore_adafactor_full":
        name, extra = "galore_adafactor", dict(proj_type="full", beta1=0.9)
    elif name == "adafactor_one_sided":
        name, extra = "adafactor", dict(one_sided=True)
    elif name == "adalomo_svd4":
        name, extra = "adalomo", dict(factorization="svd", factor_rank=4)
    cfg = _cfg(name, rank=8, lowrank_targets=targets, **extra)
    model = _small_model()
    opt = REGISTRY[cfg.name](model, cfg).build()
    _train(model, opt, 1, 128)
    assert measured_state_bytes(opt) == formula_state_bytes(model, cfg)


@pytest.mark.parametrize(
    ("name", "extra"),
    [("galore_adamw", dict(proj_type=side)) for side in ("std", "reverse_std", "left", "right", "full")]
    + [("galore_adafactor", dict(proj_type="full", beta1=0.9)), ("adamem", {})],
)
def test_the_formula_caps_the_rank_at_both_sides_of_a_matrix(name, extra):
    """rank 100 > 64 = the width: every basis has min(rank, m, n) vectors, on whichever side it projects."""
    cfg = _cfg(name, rank=100, lowrank_targets="all", **extra)
    model = _small_model()
    opt = REGISTRY[cfg.name](model, cfg).build()
    _train(model, opt, 1, 128)
    assert measured_state_bytes(opt) == formula_state_bytes(model, cfg)


def test_state_bytes_table_small():
    rows = state_bytes_table(
        ModelConfig(d_model=64, n_layers=2, vocab_size=128, max_seq_len=32), optim_cfg=OptimConfig(rank=8)
    )
    for r in rows:
        assert r["measured_bytes"] == r["formula_bytes"], r
    assert [r["optimizer"] for r in rows] == [
        "adamw",
        "adafactor",
        "adafactor_momentum",
        "galore_adamw",
        "galore_adafactor",
        "adamem",
        "adalomo",
    ]


def _stepped(opt_cls, shape, dtype=torch.float32, **kw):
    p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
    p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    opt = opt_cls([p], **kw)
    opt.step()
    return opt


def test_per_rank_state_bytes_hold_the_largest_row_chunk_and_the_unsharded_tensors_whole():
    """FSDP2 splits 10 rows over 4 ranks as torch.chunk does: 3, 3, 3, 1. The busiest rank (3 rows) sets the
    per-rank memory that tools/bench_engines.py reports; state that does not follow the rows (AdamW's step,
    Adafactor's column statistic) is whole on every rank and still counts."""
    adamw = _stepped(torch.optim.AdamW, (10, 3))
    # exp_avg + exp_avg_sq: 2 x 3 rows x 3 cols x 4 bytes; the fp32 step tensor (4 bytes) whole
    assert state_bytes_per_rank(adamw, 4) == 2 * 3 * 3 * 4 + 4
    assert state_bytes_per_rank(adamw, 1) == 2 * 10 * 3 * 4 + 4  # one rank holds everything
    adafactor = _stepped(Adafactor, (10, 3), beta1=0.9)
    # exp_avg (3 x 3) and the row statistic (3) follow the rows; the column statistic (3) is whole
    assert state_bytes_per_rank(adafactor, 4) == 4 * (3 * 3 + 3 + 3)


def test_measured_state_bytes_count_each_tensors_own_element_size():
    """torch's AdamW keeps its moments in the parameter's dtype: a bf16 parameter's state is half the size
    of an fp32 one's (its step counter stays a 4-byte fp32 tensor)."""
    opt = _stepped(torch.optim.AdamW, (10, 3), dtype=torch.bfloat16)
    assert measured_state_bytes(opt) == 2 * 30 * 2 + 4


def test_the_adafactor_table_row_has_no_momentum_and_the_momentum_row_one_per_weight():
    """The two Adafactor rows differ exactly by the fp32 first moment, one float per parameter (every
    parameter of the plain model is trained); a plain row that kept beta1 would equal the momentum row."""
    mcfg = ModelConfig(d_model=64, n_layers=2, vocab_size=128, max_seq_len=32)
    rows = {r["optimizer"]: r for r in state_bytes_table(mcfg, ["adafactor", "adafactor_momentum"])}
    n = sum(p.numel() for p in Transformer(mcfg).parameters())
    assert rows["adafactor_momentum"]["measured_bytes"] - rows["adafactor"]["measured_bytes"] == 4 * n
    assert rows["adafactor_momentum"]["formula_bytes"] - rows["adafactor"]["formula_bytes"] == 4 * n


def test_the_state_bytes_table_prints_mebibytes():
    """tools/model_info.py's table: MiB = 2^20 bytes, "-" where an optimizer has no formula."""

    rows = [
        dict(optimizer="adamw", measured_bytes=3 * 2**20, formula_bytes=5 * 2**20, n_params=10, bytes_per_param=1.5),
        dict(optimizer="other", measured_bytes=2**19, formula_bytes=None, n_params=10, bytes_per_param=0.25),
    ]
    header, first, second = format_state_bytes_table(rows).splitlines()
    assert header.split() == ["optimizer", "measured", "MiB", "formula", "MiB", "bytes/param"]
    assert first.split() == ["adamw", "3.0", "5.0", "1.500"]
    assert second.split() == ["other", "0.5", "-", "0.250"]
