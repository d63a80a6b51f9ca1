"""The LLaMA arch (model.arch: llama, model/llama.py): structure, initialisation, parameter counts against the
closed form and GaLore's published sizes, parity with HF transformers' LlamaForCausalLM, optimizer roles."""

import pytest
import torch

from model import FLAVORS, ModelConfig, Transformer, param_counts
from model.llama import LlamaBlock
from model.rms_norm import RMSNorm
from optim.param_groups import describe_parameters

LLAMA_FLAVORS = [f for f in FLAVORS if f.startswith("llama_")]
# /work/shared/notes/llama-family.md: GaLore's configs/llama_*.json at vocab 32000 (millions, as the note rounds).
GALORE_SIZES_M = {"llama_60m": 58.1, "llama_130m": 134.1, "llama_350m": 367.9, "llama_1b": 1339.0}
GALORE_SIZES_M["llama_7b"] = 6738.4  # LLaMA-7B's 6,738,415,616 at vocabulary 32000


def small_cfg(**kw) -> ModelConfig:
    base = dict(arch="llama", d_model=128, n_layers=2, mlp_hidden=352, norm_eps=1e-6, vocab_size=256, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def closed_form(d: int, h: int, layers: int, vocab: int) -> int:
    """LLaMA: per block q, k, v, o (4 d^2) + gate, up, down (3 d h) + two RMSNorms (2 d); final RMSNorm d;
    embedding and untied output 2 V d."""
    return layers * (4 * d * d + 3 * d * h + 2 * d) + d + 2 * vocab * d


def test_parameter_names_and_shapes():
    model = Transformer(small_cfg())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    block0 = {n.removeprefix("blocks.0."): s for n, s in shapes.items() if n.startswith("blocks.0.")}
    assert block0 == {
        "attn_norm.weight": (128,),
        "attn.q.weight": (128, 128),
        "attn.k.weight": (128, 128),
        "attn.v.weight": (128, 128),
        "attn.out.weight": (128, 128),
        "mlp_norm.weight": (128,),
        "mlp.gate.weight": (352, 128),
        "mlp.up.weight": (352, 128),
        "mlp.down.weight": (128, 352),
    }
    assert shapes["embed.weight"] == (256, 128) and shapes["lm_head.weight"] == (256, 128)
    assert shapes["norm.weight"] == (128,)
    assert all(isinstance(b, LlamaBlock) for b in model.blocks) and isinstance(model.norm, RMSNorm)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * 2 + 1 and all(n.eps == 1e-6 for n in norms)  # model.norm_eps
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()  # untied
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_initialisation_is_hf_llama():
    """Every matrix and the embedding ~ N(0, 0.02), including out and down (no GPT-2 residual scaling); norms 1."""
    torch.manual_seed(0)
    model = Transformer(small_cfg(d_model=256, n_layers=8, mlp_hidden=704, vocab_size=4096))
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.all(p == 1), name
        else:
            assert p.mean().abs().item() < 2e-3, name
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name


@pytest.mark.parametrize("flavor", LLAMA_FLAVORS)
def test_flavour_param_counts(flavor):
    """The closed form, the built module (meta device: no memory) and GaLore's published size agree."""
    galore = ModelConfig.from_flavor(flavor, vocab_size=32000)  # GaLore's configs' vocabulary
    d, h, layers = galore.d_model, galore.hidden_dim, galore.n_layers
    assert galore.arch == "llama" and galore.norm_eps == 1e-6 and galore.n_heads == d // galore.head_dim
    counts = param_counts(galore)
    assert counts["total"] == closed_form(d, h, layers, 32000)
    assert counts["non_embedding"] == counts["total"] - 2 * 32000 * d
    assert counts["total"] / 1e6 == pytest.approx(GALORE_SIZES_M[flavor], abs=0.1)
    ours = ModelConfig.from_flavor(flavor)  # T5's 32100 ids padded to 32128
    assert ours.vocab_size == 32128
    with torch.device("meta"):
        model = Transformer(ours)
    assert sum(p.numel() for p in model.parameters()) == param_counts(ours)["total"] == closed_form(d, h, layers, 32128)


def test_published_widths():
    """GaLore's configs/llama_*.json: hidden, intermediate, layers, heads."""
    got = {
        f: (c.d_model, c.hidden_dim, c.n_layers, c.n_heads) for f in LLAMA_FLAVORS for c in [ModelConfig.from_flavor(f)]
    }
    assert got == {
        "llama_60m": (512, 1376, 8, 8),
        "llama_130m": (768, 2048, 12, 12),
        "llama_350m": (1024, 2736, 24, 16),
        "llama_1b": (2048, 5461, 24, 32),
        "llama_7b": (4096, 11008, 32, 32),  # heads of 128 (model.head_dim), the others' of 64
    }


def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = norm.weight.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x.float()).double(), expected, rtol=1e-6, atol=1e-6)
    # bf16 input: statistics in fp32, cast back to bf16 before the (fp32) weight, as HF's LlamaRMSNorm.
    xb = x.to(torch.bfloat16)
    ref = norm.weight * (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(xb), ref)


def _hf_name(name: str) -> str:
    """Our parameter name -> HF LlamaForCausalLM's."""
    if name in ("embed.weight", "norm.weight"):
        return "model." + name.replace("embed", "embed_tokens")
    if name == "lm_head.weight":
        return name
    _, i, rest = name.split(".", 2)
    rest = {
        "attn_norm.weight": "input_layernorm.weight",
        "mlp_norm.weight": "post_attention_layernorm.weight",
        "attn.out.weight": "self_attn.o_proj.weight",
    }.get(rest) or rest.replace("attn.", "self_attn.").replace(".weight", "_proj.weight")
    return f"model.layers.{i}.{rest}"


@pytest.mark.parametrize(("d_model", "head_dim"), [(128, 64), (256, 128)], ids=["head_dim64", "head_dim128"])
def test_parity_with_hf_llama(d_model, head_dim):
    """Same weights in HF transformers' LlamaForCausalLM (eager attention, its own RoPE and RMSNorm): logits and
    every gradient agree on fp32 CPU, with two heads of 64 and of 128 (LLaMA-7B's). Weights are drawn larger than
    the init (std 0.1, norm weights around 1) so attention is far from uniform and a RoPE, head-layout or norm
    mismatch shows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = small_cfg(d_model=d_model, head_dim=head_dim)
    hf_cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=d_model,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ours, hf = Transformer(cfg), LlamaForCausalLM(hf_cfg).float()
    hf_params = dict(hf.named_parameters())
    assert len(hf_params) == len(list(ours.parameters()))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
            hf_params[_hf_name(name)].copy_(p)
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    logits = ours(tokens)
    hf_logits = hf(input_ids=tokens).logits
    assert logits.std() > 1  # far from the init's near-uniform logits
    torch.testing.assert_close(logits, hf_logits, rtol=1e-5, atol=2e-5)
    targets = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    torch.nn.functional.cross_entropy(hf_logits.flatten(0, 1), targets.flatten()).backward()
    for name, p in ours.named_parameters():
        g = hf_params[_hf_name(name)].grad
        assert p.grad is not None and g is not None
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)


def test_optimizer_roles():
    """optim.param_groups sees every block matrix (q, k, v, out, gate, up, down) as a low-rank candidate, RMSNorm
    weights as norms (no weight decay), and the embedding / output layer by name."""
    model = Transformer(small_cfg(n_layers=3))
    roles = {info.name: (info.role, info.layer) for info in describe_parameters(model)}
    for i in range(3):
        for m in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.gate", "mlp.up", "mlp.down"):
            assert roles.pop(f"blocks.{i}.{m}.weight") == ("block_matrix", i)
        for n in ("attn_norm", "mlp_norm"):
            assert roles.pop(f"blocks.{i}.{n}.weight") == ("norm", i)
    assert roles == {
        "embed.weight": ("embedding", None),
        "norm.weight": ("norm", None),
        "lm_head.weight": ("output", None),
    }


def test_optimizer_roles_see_through_ddp_and_compile_wrappers() -> None:
    """A DDP-style `.module` wrapper and torch.compile's `_orig_mod.` prefix change neither the names (those of
    the plain model's named_parameters) nor the roles: the block matrices stay low-rank candidates."""
    model = Transformer(small_cfg(n_layers=1))
    ddp_like = torch.nn.Module()
    ddp_like.module = model
    compiled = torch.compile(model)  # lazy: nothing is traced until it runs
    assert isinstance(compiled, torch.nn.Module)
    plain = list(model.named_parameters())
    for wrapped in (ddp_like, compiled):
        infos = describe_parameters(wrapped)
        assert [i.name for i in infos] == [n for n, _ in plain]
        assert all(i.param is p for i, (_, p) in zip(infos, plain, strict=True))
        roles = {i.name: (i.role, i.layer) for i in infos}
        assert roles["blocks.0.attn.q.weight"] == ("block_matrix", 0)
        assert roles["embed.weight"] == ("embedding", None)


def test_llama_7b_has_the_published_heads():
    """GaLore's configs/llama_7b.json (LLaMA-7B): 32 heads of 128 (model.head_dim; the other flavours' heads are
    64 wide, test_published_widths); an odd head width, which RoPE cannot rotate in pairs, is refused."""
    seven = ModelConfig.from_flavor("llama_7b")
    assert (seven.d_model, seven.n_heads, seven.head_dim, seven.hidden_dim, seven.n_layers) == (
        4096,
        32,
        128,
        11008,
        32,
    )
    assert closed_form(4096, 11008, 32, 32000) == 6_738_415_616  # the published 6.74B, at GaLore's vocabulary
    with pytest.raises(ValueError, match=r"model.head_dim=63 must be a positive even number"):
        Transformer(small_cfg(head_dim=63))
