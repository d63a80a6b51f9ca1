"""The chunked output layer + cross-entropy (model/loss.py) equals the plain full-logits loss, with gradients,
in fp32 and under bf16 autocast, for any chunk size (including one that does not divide the tokens)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from model import ModelConfig, Transformer, linear_cross_entropy_sum


def _grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor's gradient (taken off it, for the next backward)."""
    out = []
    for t in tensors:
        assert t.grad is not None
        out.append(t.grad)
        t.grad = None
    return out


def _plain(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten(), reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 32, 1000])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 8, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (4, 8), generator=g)
    want = _plain(h, w, y)
    (want * 0.37).backward()
    want_h, want_w = _grads(h, w)
    got = linear_cross_entropy_sum(h, w, y, chunk)
    (got * 0.37).backward()
    got_h, got_w = _grads(h, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # fp32 rounding: another summation order over the chunks (and a matrix-vector kernel at chunk 1).
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 1000])
def test_ignored_targets_have_no_loss_and_no_gradient_as_in_the_plain_loss(chunk):
    # F.cross_entropy leaves out targets of -100 (padding, masked tokens) from the loss and its gradient; the
    # chunked path did from the loss only (its one-hot indexed column vocab - 100). Vocab 120 keeps -100 a
    # valid negative index, so the old code ran and gave wrong gradients rather than an IndexError.
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 6, 16, generator=g, requires_grad=True)
    w = torch.randn(120, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 120, (2, 6), generator=g)
    y[0, 1] = y[1, 4] = y[1, 5] = -100
    want = _plain(h, w, y)
    want.backward()
    want_h, want_w = _grads(h, w)
    assert float(want_h[1, 4].abs().max()) == 0.0  # the reference: an ignored token gets no gradient
    got = linear_cross_entropy_sum(h, w, y, chunk)
    got.backward()
    got_h, got_w = _grads(h, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_it_follows_the_plain_path_to_bf16_precision():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 64, 32, generator=g, requires_grad=True)
    w = (0.1 * torch.randn(300, 32, generator=g)).requires_grad_()
    y = torch.randint(0, 300, (2, 64), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _plain(h, w, y)
    want.backward()
    want_h, want_w = _grads(h, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy_sum(h, w, y, 40)
    got.backward()
    got_h, got_w = _grads(h, w)
    assert got.dtype == got_w.dtype == got_h.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    # bf16 rounding (8 bits): the plain path rounds the weight gradient's one matmul to bf16 once, the chunked
    # path each chunk's; errors are relative to the gradient's scale.
    for got_g, want_g in ((got_h, want_h), (got_w, want_w)):
        torch.testing.assert_close(got_g, want_g, rtol=2e-2, atol=1e-2 * float(want_g.abs().max()))


def test_the_model_computes_its_loss_chunked_without_full_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, n_layers=2, vocab_size=512, max_seq_len=32))
    tokens = torch.randint(0, 512, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    plain = model(x, targets=y)  # loss_chunk_tokens=0: from the full logits
    logits = model(x)
    torch.testing.assert_close(plain, F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
    seen: list[torch.Size] = []
    real_linear = F.linear

    def watch(inp, weight, bias=None):
        out = real_linear(inp, weight, bias)
        seen.append(out.shape)
        return out

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "linear", watch)
        chunked = model(x, targets=y, loss_chunk_tokens=5)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    vocab_shaped = [s for s in seen if s[-1] == 512]
    assert vocab_shaped and max(s.numel() for s in vocab_shaped) == 5 * 512  # never more than a chunk of logits
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        linear_cross_entropy_sum(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), 0)


@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_it_keeps_only_the_gradients_backward_asks_for(frozen):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 8, 16, generator=g, requires_grad=frozen != "hidden")
    w = torch.randn(50, 16, generator=g, requires_grad=frozen != "weight")
    want = _plain(h, w, y := torch.randint(0, 50, (3, 8), generator=g))
    want.backward()
    (want_g,) = _grads(h if frozen == "weight" else w)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = linear_cross_entropy_sum(h, w, y, 5)
    got.backward()
    trained, kept = (h, w) if frozen == "weight" else (w, h)
    torch.testing.assert_close(_grads(trained)[0], want_g, rtol=1e-5, atol=1e-6)
    assert kept.grad is None
    # Kept from forward to backward: the trained input's gradient, and no buffer for the frozen one's.
    assert saved == [torch.Size([3 * 8, 16]) if frozen == "weight" else w.shape]


def _vocab_sized_logits(model: Transformer, x: torch.Tensor, y: torch.Tensor, grad: bool) -> int:
    """The most elements of one vocab-wide output of F.linear while the model computes its loss, chunk 5."""
    seen: list[int] = []
    real_linear = F.linear

    def watch(inp, weight, bias=None):
        out = real_linear(inp, weight, bias)
        if out.shape[-1] == model.cfg.vocab_size:
            seen.append(out.numel())
        return out

    with torch.set_grad_enabled(grad), pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "linear", watch)
        model(x, targets=y, loss_chunk_tokens=5)
    return max(seen)


def test_the_model_takes_the_plain_loss_when_it_is_the_smaller():
    # Plain: tokens x vocab fp32 log-probabilities kept; chunked: the vocab x d fp32 weight gradient.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, n_layers=1, vocab_size=512, max_seq_len=64))
    vocab = model.cfg.vocab_size
    few = torch.randint(0, vocab, (2, 33))  # 64 tokens = d: plain is smaller
    many = torch.randint(0, vocab, (2, 34))  # 66 tokens > d: chunked is smaller
    assert _vocab_sized_logits(model, few[:, :-1], few[:, 1:], grad=True) == 64 * vocab
    assert _vocab_sized_logits(model, many[:, :-1], many[:, 1:], grad=True) == 5 * vocab
    # Without a weight gradient to keep (no grad, or a frozen output layer), chunked is always the smaller.
    assert _vocab_sized_logits(model, few[:, :-1], few[:, 1:], grad=False) == 5 * vocab
    model.lm_head.weight.requires_grad_(False)
    assert _vocab_sized_logits(model, few[:, :-1], few[:, 1:], grad=True) == 5 * vocab


def test_a_replaced_output_layer_forward_runs_whatever_the_chunk_size() -> None:
    """GaLore's projected backward replaces lm_head's forward (an instance attribute, optim/projected_backward.py):
    the model must call it, not the chunked loss over lm_head.weight, even where chunked would be the smaller."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, n_layers=1, vocab_size=512, max_seq_len=64))
    tokens = torch.randint(0, 512, (2, 41))  # 80 tokens > d: chunked is otherwise the smaller
    x, y = tokens[:, :-1], tokens[:, 1:]
    plain = model(x, targets=y)
    calls: list[torch.Size] = []
    head = model.lm_head

    def replaced(inp: torch.Tensor) -> torch.Tensor:
        calls.append(inp.shape)
        return F.linear(inp, head.weight)

    head.forward = replaced  # type: ignore[method-assign, assignment]
    got = model(x, targets=y, loss_chunk_tokens=5)
    assert calls == [torch.Size([2, 40, 64])]
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=0)


def test_bf16_weights_give_an_fp32_plain_loss_of_the_bf16_logits() -> None:
    """FSDP2's bf16 param_dtype runs the model in bf16 without autocast: the plain (full-logits) loss is still the
    fp32 cross-entropy of the bf16 logits, not a bf16-rounded one."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, n_layers=1, vocab_size=512, max_seq_len=64)).to(torch.bfloat16)
    tokens = torch.randint(0, 512, (2, 33))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logits = model(x).double()
        loss = model(x, targets=y)
    want = (torch.logsumexp(logits, -1) - logits.gather(-1, y[..., None]).squeeze(-1)).sum()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)


def test_under_bf16_autocast_the_log_softmax_is_fp32_over_the_bf16_logits():
    # The loss is fp32 cross-entropy of the bf16-rounded logits, as the plain path's logits.float(): CPU autocast
    # leaves log_softmax in bf16, so without the cast the loss would be off by bf16 rounding (~1e-3).
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 64, 32, generator=g)
    w = 0.5 * torch.randn(300, 32, generator=g)
    y = torch.randint(0, 300, (2, 64), generator=g)
    bf16_logits = (h.bfloat16() @ w.bfloat16().T).float()
    want = F.cross_entropy(bf16_logits.flatten(0, 1), y.flatten(), reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy_sum(h, w, y, 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_bf16_weights_accumulate_the_loss_and_weight_gradient_in_fp32_over_chunks():
    # FSDP2's bf16 param_dtype hands the loss bf16 hidden states and weight. 512 identical tokens one per chunk:
    # the closed form is 512 x one token's loss and gradient; a bf16 running sum stalls at 256 x a term (257 is
    # not a bf16 number), so the sums over chunks must be fp32.
    g = torch.Generator().manual_seed(3)
    n, d, vocab, target = 512, 8, 16, 3
    h0 = torch.randn(d, generator=g).bfloat16()
    w = torch.randn(vocab, d, generator=g).bfloat16().requires_grad_()
    h = h0.expand(1, n, d).clone().requires_grad_()
    y = torch.full((1, n), target)
    p = torch.softmax(w.detach().double() @ h0.double(), dim=0)
    got = linear_cross_entropy_sum(h, w, y, 1)
    got.backward()
    assert got.dtype == torch.float32 and w.grad is not None and h.grad is not None
    torch.testing.assert_close(got.double(), -n * p[target].log(), rtol=1e-2, atol=0)
    one_hot = F.one_hot(torch.tensor(target), vocab).double()
    want_w = n * torch.outer(p - one_hot, h0.double())
    torch.testing.assert_close(w.grad.double(), want_w, rtol=2e-2, atol=2e-2 * float(want_w.abs().max()))
    want_h = ((p - one_hot) @ w.detach().double()).expand(1, n, d)
    torch.testing.assert_close(h.grad.double(), want_h, rtol=2e-2, atol=2e-2 * float(want_h.abs().max()))


@pytest.mark.parametrize("trained", [(), ("hidden",), ("weight",), ("hidden", "weight")])
def test_it_does_the_plain_path_matmuls_and_no_more(trained):
    # Closed-form FLOPs of the plain path: 2 N d V for the logits, and 2 N d V for each gradient backward asks
    # for (no recomputation); none for a frozen input, and none at all under no_grad (an eval loss).
    g = torch.Generator().manual_seed(4)
    n, d, vocab = 24, 16, 50
    h = torch.randn(n, d, generator=g, requires_grad="hidden" in trained)
    w = torch.randn(vocab, d, generator=g, requires_grad="weight" in trained)
    y = torch.randint(0, vocab, (n,), generator=g)
    with FlopCounterMode(display=False) as flops:
        linear_cross_entropy_sum(h, w, y, 7)
    assert flops.get_total_flops() == 2 * n * d * vocab * (1 + len(trained))
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        linear_cross_entropy_sum(h.detach().requires_grad_(), w.detach().requires_grad_(), y, 7)
    assert flops.get_total_flops() == 2 * n * d * vocab
