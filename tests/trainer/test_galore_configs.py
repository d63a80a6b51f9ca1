"""configs/galore (GaLore's C4 setup on the LLaMA arch) and the Table 1 sweep: every file loads and builds its model."""

from pathlib import Path

import pytest
import torch

from model import Transformer, param_counts
from trainer.config import load_config
from trainer.sweep import expand_sweep

REPO = Path(__file__).resolve().parents[2]
GALORE = REPO / "configs" / "galore"
# size: (steps, warmup, GaLore / adapter rank, parameters at vocab 32128: the LLaMA closed form)
SIZES = {
    "llama_60m": (10_000, 1_000, 128, 58_204_672),
    "llama_130m": (20_000, 2_000, 256, 134_302_464),
    "llama_350m": (60_000, 6_000, 256, 368_231_424),
}
METHODS = ("adamw", "galore", "lora", "relora")


def test_one_file_per_size_and_method():
    assert sorted(p.name for p in GALORE.glob("*.yaml")) == sorted(f"{s}_{m}.yaml" for s in SIZES for m in METHODS)


@pytest.mark.parametrize("path", sorted(GALORE.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_loads_and_builds(path):
    cfg = load_config(path)
    size, method = path.stem.rsplit("_", 1)
    steps, warmup, rank, n_params = SIZES[size]
    assert cfg.model.flavor == size and cfg.model.arch == "llama"
    assert (cfg.data.seq_len, cfg.train.global_batch, cfg.train.max_steps) == (256, 512, steps)
    assert (cfg.scheduler.warmup_steps, cfg.scheduler.final_lr_ratio) == (warmup, 0.1)
    assert (cfg.optim.weight_decay, cfg.train.max_grad_norm, cfg.optim.beta2) == (0.0, 0.0, 0.999)
    assert cfg.run.dir == f"runs/galore/{path.stem}"
    if method == "galore":
        o = cfg.optim
        assert (o.name, o.lr, o.scale, o.rank, o.update_proj_gap, o.eps) == (
            "galore_adamw",
            0.01,
            0.25,
            rank,
            200,
            1e-6,
        )
    else:
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.eps) == ("adamw", 1e-3, 1e-8)
    assert cfg.adapter.method == {"lora": "lora", "relora": "relora"}.get(method, "none")
    if cfg.adapter.method != "none":
        assert (cfg.adapter.rank, cfg.adapter.alpha) == (rank, 32.0)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg.model)["total"] == n_params


def test_table1_sweep():
    """Adam and GaLore on llama_130m at beta2 .95 and .999: four runs, each in its own directory."""
    runs = expand_sweep(REPO / "configs" / "sweeps" / "galore_table1.yaml")
    got = []
    for path, overrides in runs:
        cfg = load_config(path, overrides)
        assert cfg.model.flavor == "llama_130m" and cfg.train.max_steps == 20_000
        got.append((cfg.optim.name, cfg.optim.beta2, cfg.run.dir))
    assert sorted(got) == [
        ("adamw", 0.95, "runs/sweeps/galore_table1/llama_130m_adamw/beta2_0.95"),
        ("adamw", 0.999, "runs/sweeps/galore_table1/llama_130m_adamw/beta2_0.999"),
        ("galore_adamw", 0.95, "runs/sweeps/galore_table1/llama_130m_galore/beta2_0.95"),
        ("galore_adamw", 0.999, "runs/sweeps/galore_table1/llama_130m_galore/beta2_0.999"),
    ]
