"""LoRA / ReLoRA through the trainer (in-process runs on the prepared sample corpus, CPU, seconds
each): frozen weights stay frozen, ReLoRA's restarts merge them, exact resume across a restart, the
jagged lr in the logs, fused in-backward updates equal to the ordinary path."""

import torch

from tests.helpers.runs import losses, run
from trainer import checkpoint as ckpt
from trainer.metrics import read_metrics
from trainer.schedule import lr_factor

FROZEN = [f"blocks.{i}.{lin}.weight" for i in range(2) for lin in ("attn.qkv", "attn.out", "mlp.up", "mlp.down")]
LORA = {"adapter.method": "lora", "adapter.rank": 8}
RELORA = {
    "adapter.method": "relora",
    "adapter.rank": 8,
    "adapter.reset_interval": 2,
    "adapter.restart_warmup_steps": 2,
    "adapter.prune_ratio": 0.9,
}


def model_at(run_dir, step: int) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.pt")["model"]


def resume_across_step_3(tmp_path, sample_tokens, overrides: dict):
    """Run 6 steps straight, and again resumed from the step-3 checkpoint: the same losses at every step and the
    same final weights, bit for bit. Returns the straight run's config."""
    cfg, _ = run(tmp_path, sample_tokens, "straight", **overrides)
    run(tmp_path, sample_tokens, "resumed", **overrides)
    (tmp_path / "resumed" / "checkpoints" / "step_00000006.pt").unlink()
    _, result = run(tmp_path, sample_tokens, "resumed", **overrides)
    assert result.final_step == 6
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in a), (a, b)
    final_a, final_b = model_at(tmp_path / "straight", 6), model_at(tmp_path / "resumed", 6)
    for name, tensor in final_a.items():
        assert torch.equal(tensor, final_b[name]), name
    return cfg


def test_lora_trains_the_adapters_and_never_the_frozen_weights(tmp_path, sample_tokens, capsys):
    run(tmp_path, sample_tokens, **LORA)
    assert "adapters: lora r=8 alpha=32 dropout=0.1 on 8 linears" in capsys.readouterr().out
    at3, at6 = model_at(tmp_path / "run", 3), model_at(tmp_path / "run", 6)
    assert {f"{w.removesuffix('.weight')}.{ab}" for w in FROZEN for ab in ("lora_a", "lora_b")} <= set(at6)
    for name in FROZEN:
        assert torch.equal(at3[name], at6[name]), name
    for name in ("blocks.0.attn.qkv.lora_b", "blocks.1.mlp.down.lora_a", "embed.weight", "lm_head.weight"):
        assert not torch.equal(at3[name], at6[name]), name


def test_relora_merges_at_restarts_and_resumes_bit_exact_across_one(tmp_path, sample_tokens):
    """Restarts after steps 2, 4 and 6; the resumed run restarts from the step-3 checkpoint, so its
    restart at step 4 draws A again from (run.seed, 2) and prunes restored optimizer state."""
    cfg = resume_across_step_3(tmp_path, sample_tokens, RELORA)
    final_a = model_at(tmp_path / "straight", 6)
    at3 = model_at(tmp_path / "straight", 3)
    for name in FROZEN:
        assert not torch.equal(at3[name], final_a[name]), name  # the restarts merged into them
        assert torch.count_nonzero(final_a[name.replace(".weight", ".lora_b")]) == 0  # restarted after step 6
    # Jagged lr: the update right after each restart runs at 1/restart_warmup_steps of the schedule.
    lrs = {r["step"]: r["train/lr"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "train/lr" in r}
    schedule = [lr_factor(s, warmup_steps=2, max_steps=6, final_lr_ratio=0.1) * cfg.optim.lr for s in range(6)]
    jagged = [1, 1, 0.5, 1, 0.5, 1]
    assert [lrs[s + 1] for s in range(6)] == [f * j for f, j in zip(schedule, jagged, strict=True)]


def test_fused_update_with_relora_matches_the_ordinary_path(tmp_path, sample_tokens):
    extra = {**RELORA, "train.max_grad_norm": 0, "train.max_steps": 4, "optim.fused": False}
    run(tmp_path, sample_tokens, "plain", **extra)
    run(tmp_path, sample_tokens, "fused", **extra, **{"train.fused_update": True})
    assert losses(tmp_path / "plain") == losses(tmp_path / "fused")
    plain, fused = model_at(tmp_path / "plain", 4), model_at(tmp_path / "fused", 4)
    for name, tensor in plain.items():
        assert torch.equal(tensor, fused[name]), name


def test_lora_with_dropout_resumes_bit_exact(tmp_path, sample_tokens):
    """LoRA's adapter dropout (0.1) draws from the global RNG every step: a resume from the step-3 checkpoint
    gives the same losses and weights only if the checkpoint restored that RNG (trainer/checkpoint.py RNGState)."""
    resume_across_step_3(tmp_path, sample_tokens, LORA)
