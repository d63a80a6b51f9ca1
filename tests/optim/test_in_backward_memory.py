"""trainer/memory_accounting.py (tools/bench_memory.py's numbers): the meta-device (shape-only) run
gives the CPU run's numbers, and fused updates keep at most one gradient alive."""

from __future__ import annotations

import types

import pytest
import torch

from model import DEFAULT_CHUNK_TOKENS, ModelConfig, Transformer
from optim import OptimConfig, optimizer_spec
from tools import bench_memory
from trainer.config import AdapterConfig
from trainer.lora import apply_adapters
from trainer.memory_accounting import measure

torch.set_num_threads(1)

CFG = ModelConfig(d_model=64, n_layers=2, vocab_size=512, max_seq_len=32)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(
    "optim", [dict(name="adamw"), dict(name="adalomo"), dict(name="adalomo", update_norm="layerwise")]
)
def test_meta_accounting_equals_cpu(optim, fused):
    cfg = OptimConfig(**optim)
    on_cpu = measure(CFG, cfg, fused, micro_batch=2, seq_len=16, device="cpu")
    on_meta = measure(CFG, cfg, fused, micro_batch=2, seq_len=16, device="meta")
    assert on_cpu == on_meta
    assert on_cpu["activations"] > 0 and on_cpu["state"] > 0


def test_fused_peak_below_ordinary():
    cfg = OptimConfig(name="adalomo")
    plain = measure(CFG, cfg, False, micro_batch=2, seq_len=16, device="meta")
    fused = measure(CFG, cfg, True, micro_batch=2, seq_len=16, device="meta")
    assert plain["grads_peak"] == plain["weights"]  # every gradient alive at once
    assert fused["grads_peak"] == 512 * 64 * 4  # the largest parameter's gradient (embedding / head)
    assert fused["peak"] < plain["peak"]


# At seq_len 64, 2 x 64 tokens > d_model: the chunked loss, which keeps the output weight's gradient from forward on.
CHUNKED = ModelConfig(d_model=64, n_layers=2, vocab_size=512, max_seq_len=64)
LORA = AdapterConfig(method="lora", rank=4, dropout=0.0)


def _model(adapter: AdapterConfig | None = None) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CHUNKED)
    if adapter is not None:
        apply_adapters(model, adapter, seed=0)
    return model


def _saved_bytes_at_forward_end(seq_len: int, adapter: AdapterConfig | None = None) -> int:
    """Hand count on CPU: every storage autograd saves in forward (loss included), once; parameters and buffers
    are not activations."""
    model = _model(adapter)
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, CHUNKED.vocab_size, (2, seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:], loss_chunk_tokens=DEFAULT_CHUNK_TOKENS)
    del loss
    return sum(saved.values())


def _state_bytes_after_a_step(cfg: OptimConfig) -> int:
    """Hand count: the bytes of every tensor in the ordinary optimizer's state after one step on random gradients."""
    model = _model()
    opt = optimizer_spec(model, cfg).build()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("adapter", [None, LORA])
@pytest.mark.parametrize("fused", [False, True])
def test_adamw_parts_formula_and_peak_against_hand_counts(fused, adapter):
    r = measure(CHUNKED, OptimConfig(name="adamw"), fused, micro_batch=2, seq_len=64, adapter=adapter)
    params = list(_model(adapter).parameters())
    trainable = [p.numel() for p in params if p.requires_grad]  # LoRA: frozen weights get no gradient, no state
    weights = 4 * sum(p.numel() for p in params)
    state = 8 * sum(trainable) + 4 * len(trainable)  # fp32 exp_avg and exp_avg_sq, a 0-d fp32 step per tensor
    grads = 4 * max(trainable) if fused else 4 * sum(trainable)  # fused: one gradient at a time
    activations = _saved_bytes_at_forward_end(64, adapter)
    assert (r["weights"], r["state"], r["activations"], r["deferred"]) == (weights, state, activations, 0)
    assert r["formula"] == weights + grads + state + activations
    # At the end of forward every saved activation is alive beside the weights and state: a floor under the peak
    # that no gradient event reaches here (backward frees the chunked loss's kept gradients before the first lands).
    assert r["peak"] >= weights + state + activations


def test_global_adalomo_fused_holds_every_direction_at_once():
    # update_norm=global defers every tensor's fp32 direction U until the last gradient: one fp32 copy of all
    # parameters, on top of the weights and state, in the peak and in the formula. 2 x 16 tokens: fewer
    # activations than that copy, so the peak is at the last gradient event, not at the end of forward.
    cfg = OptimConfig(name="adalomo", update_norm="global")
    r = measure(CHUNKED, cfg, True, micro_batch=2, seq_len=16)
    sizes = [p.numel() for p in _model().parameters()]
    weights, deferred = 4 * sum(sizes), 4 * sum(sizes)
    state = _state_bytes_after_a_step(cfg)
    activations = _saved_bytes_at_forward_end(16)
    assert activations < deferred
    assert (r["weights"], r["state"], r["activations"], r["deferred"]) == (weights, state, activations, deferred)
    assert r["formula"] == weights + 4 * max(sizes) + deferred + state + activations
    assert r["peak"] >= weights + state + deferred


GiB = 2**30


def test_bench_memory_prints_each_part_of_the_accounting_in_its_column(capsys: pytest.CaptureFixture[str]) -> None:
    """tools/bench_memory.py's rows: ordinary then fused, each column the accounting's part in GiB (2**30 bytes)."""
    bench_memory.main(["--flavors", "tiny", "--optims", "adamw", "--micro-batch", "2", "--seq-len", "32"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  tiny adamw")]
    assert [row[2] for row in rows] == ["False", "True"]
    cfg = ModelConfig.from_flavor("tiny", max_seq_len=512)
    for row, fused in zip(rows, (False, True), strict=True):
        r = measure(cfg, OptimConfig(name="adamw"), fused, 2, 32, "meta")
        keys = ("weights", "grads_peak", "state", "activations", "deferred", "peak", "formula")
        assert row[3:] == [f"{r[k] / GiB:.3f}" for k in keys]


def test_bench_memory_with_adapters_lists_only_the_full_rank_optimizers(capsys: pytest.CaptureFixture[str]) -> None:
    """LoRA leaves the low-rank methods out (trainer/config.py refuses them with adapters)."""
    bench_memory.main(["--flavors", "tiny", "--adapter-rank", "2", "--micro-batch", "1", "--seq-len", "16"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  tiny ")]
    assert sorted({row[1] for row in rows}) == ["adafactor", "adalomo", "adamw"]


def test_bench_memory_time_table_reports_fused_over_plain_and_the_updates_alone(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--time: per optimizer, plain and fused step ms, fused / plain, and each minus forward+backward alone."""
    seconds = {(False, False): 0.010, (True, False): 0.016, (True, True): 0.012}  # (optimizer?, fused)

    def fake_time_steps(
        model_cfg: ModelConfig, optim_cfg: OptimConfig | None, fused: bool, micro_batch: int, seq_len: int, steps: int
    ) -> float:
        return seconds[(optim_cfg is not None, fused)]

    monkeypatch.setattr(bench_memory, "time_steps", fake_time_steps)
    bench_memory.main(["--time", "--optims", "adamw", "--flavors", "tiny"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("adamw "))
    assert row.split() == ["adamw", "16.0", "12.0", "0.750", "6.0", "2.0"]


def test_bench_memory_time_table_defaults_to_tiny_and_honours_flavors(monkeypatch: pytest.MonkeyPatch) -> None:
    flavors: list[str] = []
    monkeypatch.setattr(bench_memory, "time_table", lambda flavor, *args: flavors.append(flavor))
    bench_memory.main(["--time", "--optims", "adamw"])
    bench_memory.main(["--time", "--optims", "adamw", "--flavors", "210m"])
    assert flavors == ["tiny", "210m"]


def test_bench_memory_step_times_leave_out_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """time_steps runs steps + 1 and takes the median of the last `steps`: step 0 allocates the state."""
    monkeypatch.setattr(bench_memory, "statistics", types.SimpleNamespace(median=len))
    cfg = ModelConfig.from_flavor("tiny", max_seq_len=8)
    assert bench_memory.time_steps(cfg, OptimConfig(name="adamw"), False, 1, 8, steps=3) == 3
