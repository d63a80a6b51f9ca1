import contextlib

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer
from trainer import step as step_module
from trainer.distributed import DistInfo
from trainer.lora import apply_lora, lora_modules
from trainer.parallelize import autocast_context, resolve_precision
from trainer.step import evaluate, forward_backward, split_micro_batches

FP32 = autocast_context("fp32", torch.device("cpu"))


def grads_and_loss(model, inputs, targets, micro_batch):
    model.zero_grad(set_to_none=True)
    loss = forward_backward(
        model, split_micro_batches(inputs, targets, micro_batch), loss_denominator=targets.numel(), autocast=FP32
    )
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_micro_batched_global_batch_equals_unsplit():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, n_layers=2, vocab_size=300, max_seq_len=32))
    tokens = torch.randint(0, 300, (8, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    full_loss, full_grads = grads_and_loss(model, inputs, targets, micro_batch=8)
    for micro in (1, 2, 4):
        loss, grads = grads_and_loss(model, inputs, targets, micro_batch=micro)
        torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
        for name in full_grads:
            torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-5, atol=1e-7)
    # And the loss is the plain mean token cross-entropy of the batch.
    with torch.no_grad():
        ref = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(full_loss, ref, rtol=1e-6, atol=1e-6)


def test_before_backward_is_armed_only_for_the_last_micro_batch():
    model = Transformer(ModelConfig(d_model=64, n_layers=1, vocab_size=100, max_seq_len=16))
    tokens = torch.randint(0, 100, (6, 9))
    calls: list[bool] = []
    forward_backward(
        model,
        split_micro_batches(tokens[:, :-1], tokens[:, 1:], 2),
        loss_denominator=48.0,
        autocast=FP32,
        before_backward=calls.append,
    )
    assert calls == [False, False, True]


def test_evaluate_is_mean_token_loss():
    torch.manual_seed(1)
    model = Transformer(ModelConfig(d_model=64, n_layers=1, vocab_size=100, max_seq_len=16))
    batches = [(torch.randint(0, 100, (3, 8)), torch.randint(0, 100, (3, 8))) for _ in range(3)]
    out = evaluate(model, batches, DistInfo(0, 1, 0, torch.device("cpu")), FP32)
    assert out is not None
    loss, ppl = out
    with torch.no_grad():
        ref = (
            torch.stack(
                [F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum") for x, y in batches]
            ).sum()
            / 72
        )
    assert abs(loss - ref.item()) < 1e-5 and abs(ppl - torch.exp(ref).item()) < 1e-3
    assert model.training  # restored


def test_evaluate_is_abandoned_when_a_stop_is_requested():
    model = Transformer(ModelConfig(d_model=64, n_layers=1, vocab_size=100, max_seq_len=16))
    batches = [(torch.randint(0, 100, (3, 8)), torch.randint(0, 100, (3, 8))) for _ in range(3)]
    asked = []

    def stop_after_two_rounds() -> bool:
        asked.append(1)
        return len(asked) > 2

    model.train()
    assert evaluate(model, batches, DistInfo(0, 1, 0, torch.device("cpu")), FP32, stop_after_two_rounds) is None
    assert len(asked) == 3 and model.training  # asked before each round; the training mode is restored


def test_evaluate_runs_with_dropout_off_and_draws_no_random_numbers():
    """LoRA's adapter dropout (adapter.dropout, 0.1 by default) is the model's only dropout: evaluation must
    switch it off (model.eval()), so the validation loss is that of the deterministic model and the RNG stream
    that the checkpoint saves is not advanced by it."""
    torch.manual_seed(2)
    model = Transformer(ModelConfig(d_model=64, n_layers=1, vocab_size=100, max_seq_len=16))
    apply_lora(model, rank=4, alpha=8.0, dropout=0.5, seed=0)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_b.normal_()  # a non-zero adapter branch, so that dropout on it would show
    batches = [(torch.randint(0, 100, (3, 8)), torch.randint(0, 100, (3, 8))) for _ in range(3)]
    model.train()
    rng = torch.get_rng_state()
    out = evaluate(model, batches, DistInfo(0, 1, 0, torch.device("cpu")), FP32)
    assert out is not None and model.training  # restored
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout mask drawn
    model.eval()
    with torch.no_grad():
        ref = torch.stack([F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum") for x, y in batches])
        ref = ref.sum() / 72
    assert out[0] == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("precision", "device", "want"),
    [
        ("auto", "cuda", "bf16"),
        ("auto", "cpu", "fp32"),
        ("auto", "mps", "fp32"),  # auto = bf16 on CUDA only
        ("auto", "meta", "fp32"),
        ("bf16", "cpu", "bf16"),
        ("fp32", "cuda", "fp32"),
    ],
)
def test_auto_precision_is_bf16_on_cuda_only(precision: str, device: str, want: str) -> None:
    assert resolve_precision(precision, torch.device(device)) == want


@pytest.mark.parametrize(
    ("precision", "want"), [("bf16", torch.bfloat16), ("fp32", torch.float32), ("auto", torch.float32)]
)
def test_autocast_context_computes_matmuls_in_the_resolved_dtype(precision: str, want: torch.dtype) -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast_context(precision, torch.device("cpu")):
        out = a @ b
    assert out.dtype == want
    torch.testing.assert_close(out.float(), a @ b, rtol=1e-2 if want == torch.bfloat16 else 1e-6, atol=1e-2)


def test_sync_skips_the_gradient_reduction_on_all_but_the_last_micro_batch() -> None:
    """DDP's no_sync on every micro-batch but the last: one all-reduce per step, not one per micro-batch."""
    model = Transformer(ModelConfig(d_model=64, n_layers=1, vocab_size=100, max_seq_len=16))
    tokens = torch.randint(0, 100, (6, 9))
    calls: list[bool] = []

    def sync(is_last: bool) -> contextlib.AbstractContextManager:
        calls.append(is_last)
        return contextlib.nullcontext()

    forward_backward(
        model, split_micro_batches(tokens[:, :-1], tokens[:, 1:], 2), loss_denominator=48.0, autocast=FP32, sync=sync
    )
    assert calls == [False, False, True]


def test_evaluate_on_one_of_two_ranks_counts_only_its_own_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2 owns batches 1, 3, ...: with 3 batches it scores batch 1 alone, then runs one uncounted forward
    in the last round (the collective forward of FSDP2 and ZeRO-3). The all-reduce is the identity here, so the
    result is rank 1's own mean token loss."""
    monkeypatch.setattr(step_module, "all_reduce_sum", lambda value, info: value)
    torch.manual_seed(3)
    model = Transformer(ModelConfig(d_model=64, n_layers=1, vocab_size=100, max_seq_len=16))
    batches = [(torch.randint(0, 100, (3, 8)), torch.randint(0, 100, (3, 8))) for _ in range(3)]
    forwards: list[int] = []
    model.register_forward_hook(lambda module, args, output: forwards.append(1))
    out = evaluate(model, batches, DistInfo(1, 2, 1, torch.device("cpu")), FP32)
    assert out is not None
    x, y = batches[1]
    with torch.no_grad():
        ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert out[0] == pytest.approx(ref.item(), rel=1e-6)
    assert len(forwards) == 3  # its batch, the uncounted forward of the last round, and the reference above
