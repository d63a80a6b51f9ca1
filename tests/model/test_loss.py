"""The chunked output layer + cross-entropy (model/loss.py) equals the plain full-logits loss, with gradients,
in fp32 and under bf16 autocast, for any chunk size (including one that does not divide the tokens)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
