import math

import pytest
import torch

from model import ModelConfig, Transformer, flops_per_token, param_counts
from model.rms_norm import RMSNorm
from model.rope import apply_rope, rope_tables
from model.transformer import Block


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"d_model": 128, "n_layers": 2, "vocab_size": 256, "max_seq_len": 64, **kw})


@pytest.mark.parametrize("flavor,target", [("210m", 210e6), ("550m", 550e6)])
def test_paper_sizes_param_counts(flavor, target):
    cfg = ModelConfig.from_flavor(flavor)
    counts = param_counts(cfg)
    d, layers, vocab = cfg.d_model, cfg.n_layers, cfg.vocab_size
    assert counts["total"] == layers * (12 * d * d + 2 * d) + d + 2 * vocab * d
    # Built on the meta device: the real module agrees with the closed form.
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    # 550m lands within 2% of its name. 210m is the paper's width 1024 x 12 layers with untied
    # T5-vocabulary embeddings: 216.8M, 3.2% above the name (the name is approximate).
    tolerance = 0.02 if flavor == "550m" else 0.035
    assert abs(counts["total"] - target) / target < tolerance


def test_heads_and_vocab():
    cfg = ModelConfig.from_flavor("550m")
    assert cfg.n_heads == 20 and cfg.vocab_size % 128 == 0 and cfg.vocab_size >= 32100


def test_no_bias_parameters():
    model = Transformer(small_cfg())
    names = [n for n, _ in model.named_parameters()]
    assert not any("bias" in n for n in names)
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)):
            assert m.bias is None
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()  # untied


@pytest.mark.parametrize("arch", ["olmo", "llama"])
def test_causal_masking(arch):
    torch.manual_seed(0)
    model = Transformer(small_cfg(arch=arch)).eval()
    x = torch.randint(0, 256, (2, 32))
    y = x.clone()
    y[:, 20:] = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_rope_matches_direct_formula():
    head_dim, seq, theta = 8, 5, 10000.0
    cos, sin = rope_tables(head_dim, seq, theta)
    x = torch.randn(1, 1, seq, head_dim)
    out = apply_rope(x, cos, sin)
    half = head_dim // 2
    for p in range(seq):
        for i in range(half):
            angle = p * theta ** (-2 * i / head_dim)
            a, b = x[0, 0, p, i].item(), x[0, 0, p, i + half].item()
            assert out[0, 0, p, i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-5)
            assert out[0, 0, p, i + half].item() == pytest.approx(b * math.cos(angle) + a * math.sin(angle), abs=1e-5)


def test_rope_relative_position_property():
    # q.k after RoPE depends only on the offset between positions.
    head_dim = 64
    cos, sin = rope_tables(head_dim, 32, 10000.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def dot(pq, pk):
        rq = apply_rope(q.view(1, 1, 1, -1), cos[pq : pq + 1], sin[pq : pq + 1])
        rk = apply_rope(k.view(1, 1, 1, -1), cos[pk : pk + 1], sin[pk : pk + 1])
        return (rq * rk).sum().item()

    assert dot(3, 1) == pytest.approx(dot(12, 10), rel=1e-4)


def test_rope_keeps_the_input_dtype_and_its_fp32_tables_are_accurate_at_long_positions() -> None:
    head_dim, seq, theta = 128, 8192, 500000.0
    cos, sin = rope_tables(head_dim, seq, theta)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (seq, head_dim)
    for p in (seq - 1, 4097):
        for i in (1, 17, 40):
            angle = p * theta ** (-2 * i / head_dim)
            for j in (i, i + head_dim // 2):
                assert cos[p, j].item() == pytest.approx(math.cos(angle), abs=2e-6)
                assert sin[p, j].item() == pytest.approx(math.sin(angle), abs=2e-6)
    x = torch.randn(1, 2, 4, head_dim).to(torch.bfloat16)
    assert apply_rope(x, cos[:4], sin[:4]).dtype == torch.bfloat16


def test_initialisation_scales():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=256, n_layers=8, vocab_size=4096)
    model = Transformer(cfg)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    block = model.blocks[0]
    assert isinstance(block, Block)
    assert block.mlp.down.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.all(block.attn_norm.weight == 1)


def test_both_residual_projections_are_depth_scaled_and_nothing_else_is() -> None:
    """GPT-2 scheme: attention `out` and MLP `down` of every block ~ N(0, 0.02 / sqrt(2 * 8 layers)) = N(0, 0.005);
    every other matrix (qkv, up, embedding, output layer) ~ N(0, 0.02)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=256, n_layers=8, vocab_size=4096))
    for name, p in model.named_parameters():
        if p.dim() == 1:
            continue
        want = 0.005 if name.endswith(("attn.out.weight", "mlp.down.weight")) else 0.02
        assert p.std().item() == pytest.approx(want, rel=0.05), name


@pytest.mark.parametrize("arch", ["olmo", "llama"])
def test_model_norm_eps_reaches_every_norm(arch: str) -> None:
    """model.norm_eps, not a default of LayerNorm (1e-5) or of the LLaMA flavours (1e-6), in each block's two norms
    and the final one."""
    model = Transformer(small_cfg(arch=arch, n_layers=3, norm_eps=1e-3))
    norm_type = RMSNorm if arch == "llama" else torch.nn.LayerNorm
    norms = [m for m in model.modules() if isinstance(m, (RMSNorm, torch.nn.LayerNorm))]
    assert len(norms) == 2 * 3 + 1 and all(type(m) is norm_type for m in norms)
    assert [m.eps for m in norms] == [1e-3] * 7


def test_rope_tables_stay_out_of_the_state_dict() -> None:
    """The RoPE tables derive from the config: a checkpoint holds the parameters only, and loads (strictly) into a
    model with another model.max_seq_len."""
    model = Transformer(small_cfg(max_seq_len=64))
    block_keys = ["attn_norm", "attn.qkv", "attn.out", "mlp_norm", "mlp.up", "mlp.down"]
    expected = {f"blocks.{i}.{k}.weight" for i in range(2) for k in block_keys}
    assert set(model.state_dict()) == expected | {"embed.weight", "norm.weight", "lm_head.weight"}
    shorter = Transformer(small_cfg(max_seq_len=32))
    shorter.load_state_dict(model.state_dict(), strict=True)
    assert shorter.rope_cos.shape[0] == 32
    torch.testing.assert_close(shorter.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_from_flavor_overrides_beat_the_flavour_values() -> None:
    cfg = ModelConfig.from_flavor("550m", n_layers=2, d_model=128, max_seq_len=1024)
    assert (cfg.flavor, cfg.d_model, cfg.n_layers, cfg.max_seq_len) == ("550m", 128, 2, 1024)
    llama = ModelConfig.from_flavor("llama_60m", norm_eps=1e-5, mlp_hidden=64)
    assert (llama.arch, llama.d_model, llama.norm_eps, llama.hidden_dim) == ("llama", 512, 1e-5, 64)


def test_from_flavor_refusals_name_the_fix() -> None:
    flavours = "tiny, 210m, 550m, llama_60m, llama_130m, llama_350m, llama_1b, llama_7b"
    with pytest.raises(ValueError) as err:
        ModelConfig.from_flavor("llama_60M")
    assert str(err.value) == f"unknown model.flavor 'llama_60M'. Did you mean 'llama_60m'? Flavours: {flavours}"
    with pytest.raises(ValueError) as err:
        ModelConfig.from_flavor("zzzz")
    assert str(err.value) == f"unknown model.flavor 'zzzz'. Flavours: {flavours}"
    with pytest.raises(TypeError, match=r"^unknown ModelConfig fields \['depth', 'width'\]$"):
        ModelConfig.from_flavor("tiny", width=64, depth=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 0}, r"model\.d_model=0 is not a positive multiple .* use e\.g\. --model\.d_model=64$"),
        ({"d_model": 100}, r"model\.d_model=100 is not a positive multiple .* use e\.g\. --model\.d_model=128$"),
        ({"d_model": 200, "head_dim": 32}, r"head dimension 32 .* use e\.g\. --model\.d_model=192$"),
        ({"n_layers": 0}, r"^model\.n_layers must be positive, got 0$"),
        ({"mlp_ratio": 0}, r"^model\.mlp_ratio must be positive, got 0$"),
        ({"vocab_size": 0}, r"^model\.vocab_size must be positive, got 0$"),
        ({"max_seq_len": -1}, r"^model\.max_seq_len must be positive, got -1$"),
    ],
)
def test_validate_refusals_name_the_key_and_the_fix(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_cfg(**overrides).validate()


def test_flops_per_token_formula():
    cfg = ModelConfig.from_flavor("210m")
    n = param_counts(cfg)["non_embedding"]
    assert flops_per_token(cfg, 512) == 6 * n + 12 * 12 * 1024 * 512 + 6 * 1024 * cfg.vocab_size


def test_head_dim_validation():
    with pytest.raises(ValueError, match="multiple of the head dimension"):
        Transformer(small_cfg(d_model=100))


def test_sequence_longer_than_rope_table_is_an_error():
    model = Transformer(small_cfg(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def reference_olmo_logits(w: dict[str, torch.Tensor], cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """The OLMo arch's forward written out from the paper's description (model/transformer.py's docstring) with plain
    tensor ops and none of the project's modules or helpers: pre-norm blocks, LayerNorm with weight and no bias,
    fused qkv rows [q | k | v] (heads contiguous within each), rotate-half RoPE on q and k with the closed-form
    angles p * theta^(-2i / head_dim), softmax(q k^T / sqrt(head_dim)) under a causal mask, exact (erf) GeLU MLP,
    final LayerNorm, untied output layer."""
    b, t = tokens.shape
    d, heads, hd, eps = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.norm_eps

    def layer_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance, eps inside the square root
        return (x - mean) / torch.sqrt(var + eps) * weight

    half = hd // 2
    pos = torch.arange(t, dtype=torch.float64)[:, None]
    angles = pos * cfg.rope_theta ** (-2 * torch.arange(half, dtype=torch.float64) / hd)  # (t, head_dim / 2)
    cos, sin = torch.cos(angles), torch.sin(angles)

    def rope(x: torch.Tensor) -> torch.Tensor:  # rotates the pair (x_i, x_{i + head_dim/2}) by angle (p, i)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def gelu(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    causal = torch.ones(t, t, dtype=torch.bool).tril()  # query p sees keys 0..p
    x = w["embed.weight"][tokens]
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        h = layer_norm(x, w[p + "attn_norm.weight"])
        q, k, v = (
            m.reshape(b, t, heads, hd).transpose(1, 2) for m in (h @ w[p + "attn.qkv.weight"].T).split(d, dim=-1)
        )
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.exp(scores - scores.amax(-1, keepdim=True))
        probs = probs / probs.sum(-1, keepdim=True)
        y = (probs @ v).transpose(1, 2).reshape(b, t, d)
        x = x + y @ w[p + "attn.out.weight"].T
        h = layer_norm(x, w[p + "mlp_norm.weight"])
        x = x + gelu(h @ w[p + "mlp.up.weight"].T) @ w[p + "mlp.down.weight"].T
    return layer_norm(x, w["norm.weight"]) @ w["lm_head.weight"].T


def test_olmo_forward_and_gradients_match_reference():
    """The default (OLMo) arch has no external reference (the LLaMA arch is checked against HF in test_llama.py):
    compare its logits, and the gradients of a loss w.r.t. every parameter, with reference_olmo_logits in fp64.
    Weights are redrawn at unit scale (norm weights too) so that attention is far from uniform and every part of the
    block moves the logits: a wrong activation, RoPE missing on q or k or in the interleaved convention, a missing
    1/sqrt(d) scale, a non-causal mask or a misplaced norm fails by orders of magnitude more than the tolerance.
    The tolerance is set by RoPE, which the model computes in fp32 even in an fp64 model (model/rope.py)."""
    torch.manual_seed(0)
    cfg = small_cfg(d_model=32, head_dim=8, n_layers=2, mlp_hidden=48, vocab_size=50, max_seq_len=16, rope_theta=100.0)
    model = Transformer(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 if name == "embed.weight" else p.shape[1] ** -0.5)
    w = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    n = cfg.n_layers
    block_keys = ["attn_norm", "attn.qkv", "attn.out", "mlp_norm", "mlp.up", "mlp.down"]
    expected = {f"blocks.{i}.{k}.weight" for i in range(n) for k in block_keys}
    assert set(w) == expected | {"embed.weight", "norm.weight", "lm_head.weight"}  # the reference uses them all

    tokens = torch.randint(0, cfg.vocab_size, (2, 11))
    targets = torch.randint(0, cfg.vocab_size, (2, 11))
    logits, ref = model(tokens), reference_olmo_logits(w, cfg, tokens)
    assert logits.dtype == torch.float64 and logits.shape == (2, 11, cfg.vocab_size)
    assert ref.abs().max() > 1  # logits of unit scale: the comparison below is not of near-zeros
    torch.testing.assert_close(logits, ref, rtol=1e-6, atol=1e-6)

    def loss_fn(lg: torch.Tensor) -> torch.Tensor:  # summed token cross-entropy, in fp64
        return (torch.logsumexp(lg, -1) - lg.gather(-1, targets[..., None]).squeeze(-1)).sum()

    loss, ref_loss = loss_fn(logits), loss_fn(ref)
    # The model's own loss path (fp32 cross-entropy, model/transformer.py) agrees with it.
    torch.testing.assert_close(model(tokens, targets).double(), ref_loss.detach(), rtol=1e-6, atol=0)
    loss.backward()
    ref_loss.backward()
    for name, p in model.named_parameters():
        ref_grad = w[name].grad
        assert p.grad is not None and ref_grad is not None, name
        assert ref_grad.abs().max() > 1e-3, name  # every parameter matters to the loss
        torch.testing.assert_close(p.grad, ref_grad, rtol=1e-6, atol=1e-6 * ref_grad.abs().max().item(), msg=name)
