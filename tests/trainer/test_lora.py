"""LoRA adapters (trainer/lora.py) and ReLoRA restarts (trainer/relora.py) on a tiny model, without
the trainer: the no-op start, the forward's closed form, merge, which parameters train, the optimizer
state reset (both update strategies), the jagged lr, config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer
from optim import OptimConfig, optimizer_spec
from optim.param_groups import describe_parameters
from optim.state_bytes import state_bytes_table
from tests.helpers.runs import tiny_overrides
from tests.helpers.tiny_lm import batch, loss_of, tiny_model
from trainer.config import AdapterConfig, ConfigError, load_config
from trainer.lora import (
    LoRALinear,
    adapter_parameters,
    apply_lora,
    lora_modules,
    merge_adapters,
    merged_state_dict,
    parameter_counts,
    reinit_adapters,
)
from trainer.memory_accounting import measure
from trainer.relora import (
    AdapterSchedule,
    ReLoRASchedule,
    build_adapter_schedule,
    jagged_lr_multiplier,
    kept_entries,
    prune_by_magnitude_,
    reset_optimizer_state,
)
from trainer.resume_policy import check_resume_compatible
from trainer.update import build_update_strategy

torch.set_num_threads(1)
BLOCK_LINEARS = ("attn.qkv", "attn.out", "mlp.up", "mlp.down")


def lora_model(rank: int = 4, alpha: float = 8.0, dropout: float = 0.0, seed: int = 0) -> Transformer:
    model = tiny_model()
    apply_lora(model, rank=rank, alpha=alpha, dropout=dropout, seed=seed)
    return model


def wrapped(model: torch.nn.Module, name: str) -> LoRALinear:
    module = model.get_submodule(name)
    assert isinstance(module, LoRALinear)
    return module


def train_steps(model, steps: int, fused: bool = False, schedule_cfg: AdapterConfig | None = None, lr: float = 1e-2):
    """AdamW through the trainer's update strategy and protocol; returns the updater and schedule."""
    spec = optimizer_spec(model, OptimConfig(name="adamw", lr=lr, fused=False))
    params = [p for p in model.parameters() if p.requires_grad]
    updater = build_update_strategy(spec, params, fused=fused, max_grad_norm=0.0)
    schedule = build_adapter_schedule(model, updater, schedule_cfg or AdapterConfig(method="lora"), seed=0)
    for step in range(steps):
        updater.set_lr_factor(schedule.lr_multiplier(step))
        updater.before_backward(True)
        loss_of(model, batch(seed=step)).backward()
        updater.finish_backward()
        updater.commit()
        schedule.after_commit(step + 1)
    return updater, schedule


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_adapters_start_as_a_no_op_and_keep_the_base_names():
    base = tiny_model()
    tokens = batch(seed=0)[:, :-1]
    before = base(tokens)
    keys_before = set(base.state_dict())
    wrapped = apply_lora(base, rank=4, alpha=8.0, dropout=0.1, seed=0)
    base.eval()  # dropout off: the function is compared, not a random draw
    assert torch.equal(base(tokens), before)  # B = 0: bit for bit
    assert len(wrapped) == 4 * 2 and all(isinstance(m, LoRALinear) for m in wrapped)
    adapter_keys = {f"blocks.{i}.{lin}.{ab}" for i in range(2) for lin in BLOCK_LINEARS for ab in ("lora_a", "lora_b")}
    assert set(base.state_dict()) == keys_before | adapter_keys
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    frozen = {f"blocks.{i}.{lin}.weight" for i in range(2) for lin in BLOCK_LINEARS}
    assert trainable == (keys_before - frozen) | adapter_keys  # embedding, norms, lm_head stay trainable
    roles = {i.name: (i.role, i.layer) for i in describe_parameters(base)}
    assert roles["blocks.1.mlp.up.lora_a"] == ("block_matrix", 1) and "blocks.1.mlp.up.weight" not in roles
    assert roles["embed.weight"][0] == "embedding" and roles["lm_head.weight"][0] == "output"


def test_init_is_nn_linear_kaiming_uniform_drawn_from_the_seed_and_reset_index():
    model = lora_model(rank=8)
    qkv = wrapped(model, "blocks.0.attn.qkv")
    a = qkv.lora_a.detach().clone()
    # nn.Linear's default init is kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), in = 64.
    bound = 1 / math.sqrt(64)
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound and a.std() > 0.5 * bound / math.sqrt(3)
    assert all(torch.count_nonzero(m.lora_b) == 0 for _, m in lora_modules(model))
    assert torch.equal(wrapped(lora_model(rank=8), "blocks.0.attn.qkv").lora_a, a)  # same seed, same draw
    assert not torch.equal(wrapped(lora_model(rank=8, seed=1), "blocks.0.attn.qkv").lora_a, a)
    reinit_adapters(model, seed=0, reset_index=1)
    assert not torch.equal(qkv.lora_a, a)
    reinit_adapters(model, seed=0, reset_index=0)
    assert torch.equal(qkv.lora_a, a)  # a pure function of (seed, reset index)


def test_forward_is_the_closed_form():
    torch.manual_seed(3)
    lin = torch.nn.Linear(16, 24, bias=False)
    m = LoRALinear(lin, rank=4, alpha=12.0, dropout=0.0)
    with torch.no_grad():
        m.lora_b.normal_()
    x = torch.randn(5, 16)
    expected = x @ lin.weight.T + (12.0 / 4) * (x @ m.lora_a.T @ m.lora_b.T)
    torch.testing.assert_close(m(x), expected, rtol=1e-6, atol=1e-6)
    assert m.weight is lin.weight and not m.weight.requires_grad


def test_only_adapters_and_unfrozen_parameters_change():
    model = lora_model()
    before = snapshot(model)
    train_steps(model, 2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = {f"blocks.{i}.{lin}.weight" for i in range(2) for lin in BLOCK_LINEARS}
    assert changed == set(before) - frozen  # every trainable parameter moved, no frozen one


def test_merge_keeps_the_function_and_zeroes_the_adapters_and_loads_into_a_plain_model():
    model = lora_model()
    train_steps(model, 3)
    assert all(torch.count_nonzero(m.lora_b) > 0 for _, m in lora_modules(model))
    tokens = batch(seed=7)[:, :-1]
    with torch.no_grad():
        before = model(tokens)
        plain = Transformer(model.cfg)
        plain.load_state_dict(merged_state_dict(model))  # strict: the plain model's keys exactly
        torch.testing.assert_close(plain(tokens), before, rtol=1e-5, atol=1e-5)
        weights_before = {n: m.weight.clone() for n, m in lora_modules(model)}
        merge_adapters(model)
        torch.testing.assert_close(model(tokens), before, rtol=1e-5, atol=1e-5)
    for name, m in lora_modules(model):
        assert torch.count_nonzero(m.lora_b) == 0
        assert not torch.equal(m.weight, weights_before[name])
    # With B = 0 the adapter branch adds exactly zero: the merged model is the plain one, bit for bit.
    with torch.no_grad():
        assert torch.equal(model(tokens), plain(tokens))


def test_prune_keeps_exactly_the_largest_magnitudes():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 5, generator=g)
    original = t.clone()
    prune_by_magnitude_(t, 0.75)
    kept = original.abs().flatten().topk(10).indices
    expected = torch.zeros(40)
    expected[kept] = original.flatten()[kept]
    assert torch.equal(t.flatten(), expected) and torch.count_nonzero(t) == 10
    assert kept_entries(100, 0.29) == 71 and kept_entries(512, 0.999) == 1 and kept_entries(1000, 0.999) == 1
    assert kept_entries(10, 0.0) == 10


def test_jagged_lr_multiplier():
    f = [jagged_lr_multiplier(s, reset_interval=4, restart_warmup_steps=2) for s in range(12)]
    assert f == [1, 1, 1, 1, 0.5, 1, 1, 1, 0.5, 1, 1, 1]
    f = [jagged_lr_multiplier(s, reset_interval=3, restart_warmup_steps=4) for s in range(7)]
    assert f == [1, 1, 1, 0.25, 0.5, 0.75, 0.25]  # a warmup longer than the interval restarts anyway
    assert jagged_lr_multiplier(9, reset_interval=3, restart_warmup_steps=0) == 1.0


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", ["prune", "zero"])
def test_relora_restart_merges_reinitialises_and_resets_the_adapters_state(fused, mode):
    cfg = AdapterConfig(method="relora", rank=4, alpha=8.0, reset_interval=3, optimizer_reset=mode, prune_ratio=0.9)
    model = lora_model()
    updater, schedule = train_steps(model, 2, fused=fused, schedule_cfg=cfg)  # no restart yet
    assert isinstance(schedule, ReLoRASchedule) and schedule.resets_done == 0
    tokens = batch(seed=7)[:, :-1]
    # The third step, by hand, to look at the model just before its restart.
    updater.before_backward(True)
    loss_of(model, batch(seed=2)).backward()
    updater.finish_backward()
    updater.commit()
    embed_state = {k: v.clone() for k, v in updater.state_of(model.embed.weight).items()}
    adapter_states = {id(p): {k: v.clone() for k, v in updater.state_of(p).items()} for p in adapter_parameters(model)}
    frozen_before = {n: m.weight.clone() for n, m in lora_modules(model)}
    with torch.no_grad():
        logits_before = model(tokens)
    schedule.after_commit(3)
    assert schedule.resets_done == 1
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), logits_before, rtol=1e-5, atol=1e-5)  # merge: same function
    fresh = lora_model()
    reinit_adapters(fresh, seed=0, reset_index=1)
    for (name, m), (_, f) in zip(lora_modules(model), lora_modules(fresh), strict=True):
        assert not torch.equal(m.weight, frozen_before[name])  # the base weights change at a restart
        assert torch.equal(m.lora_a, f.lora_a) and torch.count_nonzero(m.lora_b) == 0
    for p in adapter_parameters(model):
        state, old = updater.state_of(p), adapter_states[id(p)]
        assert torch.equal(state["step"], old["step"])  # kept (see trainer/relora.py)
        for key in ("exp_avg", "exp_avg_sq"):
            if mode == "zero":
                assert torch.count_nonzero(state[key]) == 0
            else:
                ref = old[key].clone()
                prune_by_magnitude_(ref, 0.9)
                assert torch.equal(state[key], ref)
                assert torch.count_nonzero(state[key]) <= kept_entries(p.numel(), 0.9)
    for k, v in updater.state_of(model.embed.weight).items():
        assert torch.equal(v, embed_state[k])  # only the adapters' state is reset


def test_the_no_op_schedule_of_none_and_lora():
    model = tiny_model()
    schedule = build_adapter_schedule(model, None, AdapterConfig(), seed=0)  # type: ignore[arg-type]
    assert type(schedule) is AdapterSchedule and schedule.lr_multiplier(10**6) == 1.0
    assert schedule.describe() == "none"


def test_trainable_parameter_counts_are_the_closed_form():
    model = lora_model(rank=4)
    d, r, layers = 64, 4, 2
    adapter = layers * r * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    counts = parameter_counts(model)
    base = sum(p.numel() for p in tiny_model().parameters())
    assert counts["adapter"] == adapter and counts["total"] == base + adapter
    assert counts["frozen"] == layers * 12 * d * d and counts["trainable"] == base - layers * 12 * d * d + adapter


def test_meta_models_take_adapters_too():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_flavor("tiny"))
    apply_lora(model, rank=8, alpha=32.0, dropout=0.0, seed=0)
    assert (
        wrapped(model, "blocks.0.mlp.down").lora_a.is_meta and parameter_counts(model)["adapter"] == 4 * 8 * 16 * 128
    )  # r (in + out), 16 d per block


def adapter_overrides(tmp_path, sample_tokens, **adapter):
    """The 64-wide test model's overrides; rank 8 (the default 128 exceeds its width) unless set."""
    adapter = {"rank": 8, **adapter} if adapter.get("method", "none") != "none" else adapter
    return tiny_overrides(tmp_path / "run", sample_tokens, **{f"adapter.{k}": v for k, v in adapter.items()})


@pytest.mark.parametrize(
    ("adapter", "extra", "message"),
    [
        ({"method": "lora", "rank": 0}, {}, r"adapter.rank=0 must be in \[1, model.d_model=64\]"),
        ({"method": "lora", "rank": 65}, {}, r"adapter.rank=65 must be in \[1, model.d_model=64\]"),
        ({"method": "lora", "alpha": 0}, {}, r"adapter.alpha=0.0 must be a finite number > 0"),
        ({"method": "lora", "alpha": float("inf")}, {}, r"adapter.alpha=inf must be a finite number > 0"),
        ({"method": "lora", "dropout": 1.0}, {}, r"adapter.dropout=1.0 must be in \[0, 1\)"),
        ({"method": "relora", "reset_interval": 0}, {}, r"adapter.reset_interval=0 must be >= 1"),
        ({"method": "relora", "prune_ratio": 1.0}, {}, r"adapter.prune_ratio=1.0 must be in \[0, 1\)"),
        ({"method": "relora", "restart_warmup_steps": -1}, {}, r"adapter.restart_warmup_steps=-1 must be >= 0"),
        (
            {"method": "lora"},
            {"optim.name": "galore_adamw", "optim.rank": 8},
            r"low-rank projection of low-rank adapters.*adamw",
        ),
        ({"method": "relora"}, {"optim.name": "adamem", "optim.rank": 8}, r"low-rank projection.*--optim.name=adamw"),
        ({"method": "relora"}, {"optim.name": "adafactor"}, r"relora resets AdamW's moments.*--optim.name=adamw"),
        ({"method": "lora", "reset_interval": 10}, {}, r"adapter.reset_interval=10 set.*method=lora.*only relora"),
        ({"rank": 8}, {}, r"adapter.rank=8 set, but adapter.method=none.*--adapter.method"),
    ],
)
def test_bad_adapter_configs_are_clear_errors(tmp_path, sample_tokens, adapter, extra, message):
    overrides = adapter_overrides(tmp_path, sample_tokens, **adapter) + [f"--{k}={v}" for k, v in extra.items()]
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", overrides)


def test_good_adapter_configs_load(tmp_path, sample_tokens):
    load_config("configs/tiny.yaml", adapter_overrides(tmp_path, sample_tokens, method="lora", rank=64))
    for name in ("adafactor", "adalomo"):  # lora trains with the full-rank memory-efficient optimizers too
        load_config(
            "configs/tiny.yaml", adapter_overrides(tmp_path, sample_tokens, method="lora") + [f"--optim.name={name}"]
        )


def test_adapter_settings_cannot_change_on_resume(tmp_path, sample_tokens):
    saved = load_config("configs/tiny.yaml", adapter_overrides(tmp_path, sample_tokens, method="lora", rank=8))
    now = load_config("configs/tiny.yaml", adapter_overrides(tmp_path, sample_tokens, method="relora", rank=16))
    with pytest.raises(ConfigError, match=r"adapter.method: 'lora' -> 'relora'\n  adapter.rank: 8 -> 16"):
        check_resume_compatible(saved.to_dict(), now.to_dict(), tmp_path / "checkpoints" / "step_00000003.pt")


def test_compiled_blocks_run_the_adapters():
    """torch.compile of the blocks (trainer/parallelize.py compiles each block), traced by dynamo with
    the aot_eager backend (no C++ toolchain needed): the same logits and gradients as eager."""
    model = lora_model()
    train_steps(model, 1)
    compiled = lora_model()
    compiled.load_state_dict(model.state_dict())
    for block in compiled.blocks:
        block.compile(backend="aot_eager")
    tokens = batch(seed=4)
    torch.testing.assert_close(loss_of(compiled, tokens), loss_of(model, tokens), rtol=1e-6, atol=1e-6)
    loss_of(compiled, tokens).backward()
    loss_of(model, tokens).backward()
    for (n, p), q in zip(model.named_parameters(), compiled.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
    merge_adapters(compiled)  # an in-place change of the frozen weights is seen by the compiled blocks
    merge_adapters(model)
    torch.testing.assert_close(loss_of(compiled, tokens), loss_of(model, tokens), rtol=1e-6, atol=1e-6)


def test_dropout_applies_to_the_adapter_branch_only_in_training():
    torch.manual_seed(0)
    m = LoRALinear(torch.nn.Linear(8, 8, bias=False), rank=2, alpha=2.0, dropout=0.5)
    x = torch.randn(3, 8)
    with torch.no_grad():
        m.lora_a.normal_()  # LoRALinear alone leaves A at zero, which would hide the dropout
        m.lora_b.fill_(1.0)
    m.eval()
    torch.testing.assert_close(m(x), F.linear(x, m.weight) + F.linear(F.linear(x, m.lora_a), m.lora_b))
    m.train()
    torch.manual_seed(1)
    y = m(x)
    torch.manual_seed(1)
    mask = F.dropout(torch.ones_like(x), 0.5)
    torch.testing.assert_close(y, F.linear(x, m.weight) + F.linear(F.linear(x * mask, m.lora_a), m.lora_b))


def test_memory_and_state_bytes_count_only_the_trainable_parameters():
    """tools/bench_memory.py and tools/model_info.py with adapters: AdamW keeps 2 fp32 moments and a
    4-byte step per trainable tensor; the frozen weights have neither gradient nor state. model_info's
    bytes/param column divides by every parameter, frozen ones included: how little state the adapters add to
    the whole model."""
    mcfg = ModelConfig(d_model=64, n_layers=2, vocab_size=512, max_seq_len=32)
    adapter = AdapterConfig(method="lora", rank=4, dropout=0.0)
    model = lora_model(rank=4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    r = measure(mcfg, OptimConfig(name="adamw"), False, 2, 16, adapter=adapter)
    assert r["state"] == 8 * n + 4 * len(trainable) and r["grads_peak"] == 4 * n
    assert r["weights"] == 4 * sum(p.numel() for p in model.parameters())
    (row,) = state_bytes_table(mcfg, ["adamw"], model=model)
    assert row["measured_bytes"] == row["formula_bytes"] == 8 * n + 4 * len(trainable)
    assert row["bytes_per_param"] == (8 * n + 4 * len(trainable)) / sum(p.numel() for p in model.parameters())


def test_forward_and_merge_scale_the_adapter_by_alpha_over_rank():
    """Both factors non-zero (LoRALinear alone leaves A at zero, which hides the scale): the forward and the
    merge against the closed form y = x W^T + (alpha / r) x A^T B^T, W' = W + (alpha / r) B A."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(16, 24, bias=False)
    w0 = lin.weight.detach().clone()
    m = LoRALinear(lin, rank=4, alpha=12.0, dropout=0.0)
    with torch.no_grad():
        m.lora_a.normal_()
        m.lora_b.normal_()
    a, b = m.lora_a.detach().clone(), m.lora_b.detach().clone()
    x = torch.randn(5, 16)
    expected = x @ w0.T + 3.0 * (x @ a.T @ b.T)  # alpha / r = 12 / 4
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Sequential(m)])
    merge_adapters(model)
    torch.testing.assert_close(m.weight, w0 + 3.0 * (b @ a), rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(m.lora_b) == 0


def compiled_whole(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile of the whole model (lazy: nothing is traced until it runs), whose names gain `_orig_mod.`."""
    out = torch.compile(model, backend="aot_eager")
    assert isinstance(out, torch.nn.Module)
    return out


@pytest.mark.parametrize("rank", [0, 17])
def test_a_rank_outside_one_to_the_smaller_side_is_refused_with_the_bounds(rank: int) -> None:
    """A 24 x 16 linear takes ranks 1..16 (min of its sides), not up to its larger side."""
    with pytest.raises(ValueError, match=rf"^LoRA rank {rank} must be in \[1, 16\] for a 24 x 16 linear$"):
        LoRALinear(torch.nn.Linear(16, 24, bias=False), rank=rank, alpha=1.0, dropout=0.0)


def test_applying_lora_twice_is_refused_with_the_reason() -> None:
    model = lora_model()
    with pytest.raises(ValueError, match=r"^the model already has LoRA adapters$"):
        apply_lora(model, rank=4, alpha=8.0, dropout=0.0, seed=0)


def test_adapter_names_are_those_of_the_plain_model_under_a_wrapper() -> None:
    """In model order; a DDP-style `.module` wrapper and torch.compile's `_orig_mod.` add nothing to the names."""
    expected = [f"blocks.{i}.{lin}" for i in range(2) for lin in BLOCK_LINEARS]
    model = lora_model()
    ddp_like = torch.nn.Module()
    ddp_like.module = model
    assert [n for n, _ in lora_modules(model)] == expected
    assert [n for n, _ in lora_modules(ddp_like)] == expected
    assert [n for n, _ in lora_modules(compiled_whole(model))] == expected


def test_merged_state_dict_of_a_compiled_model_loads_into_a_plain_model() -> None:
    """torch.compile(model) prefixes every state_dict key with `_orig_mod.`: the merged state dict still has the
    plain model's keys exactly, with the adapters folded in (compared with W + (alpha / r) B A by hand)."""
    model = lora_model()
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_b.normal_()
    qkv = wrapped(model, "blocks.0.attn.qkv")
    by_hand = qkv.weight.detach() + 2.0 * (qkv.lora_b.detach() @ qkv.lora_a.detach())  # alpha / r = 8 / 4
    state = merged_state_dict(compiled_whole(model))
    assert set(state) == set(Transformer(model.cfg).state_dict())
    torch.testing.assert_close(state["blocks.0.attn.qkv.weight"], by_hand, rtol=1e-6, atol=1e-6)


def test_reinit_zeroes_a_trained_b() -> None:
    """reinit_adapters alone (not after a merge) gives the base model's function back: B <- 0."""
    model = lora_model()
    base = tiny_model()
    train_steps(model, 2)
    assert all(torch.count_nonzero(m.lora_b) > 0 for _, m in lora_modules(model))
    reinit_adapters(model, seed=0, reset_index=1)
    assert all(torch.count_nonzero(m.lora_b) == 0 for _, m in lora_modules(model))
    base.load_state_dict(merged_state_dict(model))
    tokens = batch(seed=7)[:, :-1]
    with torch.no_grad():
        assert torch.equal(model(tokens), base(tokens))


def test_bf16_merge_rounds_once_from_fp32() -> None:
    """W' = bf16(fp32(W) + (alpha / r) fp32(B) fp32(A)), one rounding, in merge_adapters and merged_state_dict
    (which keeps W's dtype), not a bf16 add of a bf16-rounded delta."""
    torch.manual_seed(5)
    lin = torch.nn.Linear(32, 48, bias=False).to(torch.bfloat16)
    m = LoRALinear(lin, rank=8, alpha=4.0, dropout=0.0)
    with torch.no_grad():
        m.lora_a.normal_()
        m.lora_b.normal_()
    w, a, b = lin.weight.detach().float(), m.lora_a.detach().float(), m.lora_b.detach().float()
    expected = (w + 0.5 * (b @ a)).to(torch.bfloat16)  # alpha / r = 4 / 8
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Sequential(m)])
    state = merged_state_dict(model)
    assert state["blocks.0.0.weight"].dtype == torch.bfloat16 and torch.equal(state["blocks.0.0.weight"], expected)
    merge_adapters(model)
    assert m.weight.dtype == torch.bfloat16 and torch.equal(m.weight, expected)


def test_prune_of_a_single_entry_and_the_reset_modes() -> None:
    t = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 1.0, -0.05, 4.0, 0.3, -1.5])
    prune_by_magnitude_(t, 0.1)  # keep 9 of 10: only -0.05 goes
    assert torch.equal(t, torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 1.0, 0.0, 4.0, 0.3, -1.5]))
    with pytest.raises(ValueError, match=r"^unknown optimizer reset 'prnue': prune or zero$"):
        reset_optimizer_state(None, [], "prnue", 0.9)  # type: ignore[arg-type]


def test_reset_skips_parameters_without_state_and_resets_the_others() -> None:
    """A parameter the optimizer never updated (empty state) is skipped, not the end of the reset."""
    model = lora_model()
    updater, _ = train_steps(model, 1)
    never_updated = torch.nn.Parameter(torch.ones(3))
    params = adapter_parameters(model)
    reset_optimizer_state(updater, [never_updated, *params], "zero", 0.0)
    for p in params:
        state = updater.state_of(p)
        assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0


def test_relora_schedule_jagged_lr_and_header() -> None:
    """The schedule passes reset_interval and restart_warmup_steps to the jagged lr in that order (distinct values
    here), and its header names the reset mode."""
    model = lora_model()
    prune = AdapterConfig(method="relora", rank=4, alpha=8.0, dropout=0.0, reset_interval=4, restart_warmup_steps=2)
    zero = AdapterConfig(method="relora", rank=4, alpha=8.0, optimizer_reset="zero", reset_interval=4)
    lora = AdapterConfig(method="lora", rank=4, alpha=8.0)
    schedule = build_adapter_schedule(model, None, prune, seed=0)  # type: ignore[arg-type]
    assert [schedule.lr_multiplier(s) for s in range(10)] == [1, 1, 1, 1, 0.5, 1, 1, 1, 0.5, 1]
    assert schedule.describe() == (
        "relora r=4 alpha=8 dropout=0 on 8 linears, merged every 4 steps (optimizer reset: prune 0.999, "
        "restart warmup 2)"
    )
    zero_header = build_adapter_schedule(model, None, zero, seed=0).describe()  # type: ignore[arg-type]
    assert zero_header.endswith(", merged every 4 steps (optimizer reset: zero, restart warmup 50)")
    plain = build_adapter_schedule(model, None, lora, seed=0)  # type: ignore[arg-type]
    assert plain.lr_multiplier(4) == 1.0 and plain.describe() == "lora r=4 alpha=8 dropout=0.1 on 8 linears"
