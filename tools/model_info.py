"""Parameter counts, FLOPs per token and optimizer state bytes for a config.

python tools/model_info.py configs/210m.yaml [--section.key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from model import Transformer, flops_per_token, param_counts
from optim.state_bytes import print_state_bytes_table
from trainer.config import ConfigError, load_config
from trainer.flop_budget import config_flops, resolve_max_steps
from trainer.lora import apply_adapters, parameter_counts

# With adapters (adapter.method lora/relora) only the full-rank optimizers apply (trainer/config.py).
ADAPTER_TABLE_ROWS = ("adamw", "adafactor", "adafactor_momentum", "adalomo")


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip())
        return 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = cfg.model
    counts = param_counts(m)
    seq = cfg.data.seq_len
    fpt = flops_per_token(m, seq)
    tokens = cfg.train.max_steps * cfg.train.global_batch * seq
    training = config_flops(cfg)  # with the projected backward / adapters, when on
    budget = resolve_max_steps(cfg)  # already resolved by load_config; says how max_steps was derived
    print(
        f"model {m.flavor} ({m.arch}): d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, "
        f"MLP hidden {m.hidden_dim}, vocab {m.vocab_size}"
    )
    print(f"  parameters      {counts['total']:>15,}  ({counts['total'] / 1e6:.1f}M)")
    print(f"  non-embedding   {counts['non_embedding']:>15,}  ({counts['non_embedding'] / 1e6:.1f}M)")
    print(f"  embedding+head  {counts['embedding']:>15,}")
    print(f"  FLOPs/token     {fpt:>15,}  (seq_len {seq}: 6N + 12*L*d*T + 6*d*V)")
    if training.refresh_interval is not None or training.per_token != fpt:
        print(
            f"  training        {training.per_token:>15,} FLOPs/token"
            + (
                f" ({training.per_token_refresh:,} on projector refreshes, every {training.refresh_interval} steps)"
                if training.refresh_interval is not None
                else ""
            )
        )
    print(
        f"  run budget      {tokens:>15,} tokens = {training.cumulative(cfg.train.max_steps):.3e} FLOPs "
        f"({cfg.train.max_steps} steps x {cfg.train.global_batch} x {seq})"
    )
    model, rows = None, None
    if cfg.adapter.method != "none":
        with torch.device("meta"):  # shapes only
            model = Transformer(m)
        apply_adapters(model, cfg.adapter, seed=cfg.run.seed)
        c, a = parameter_counts(model), cfg.adapter
        label = f"{a.method} adapters"
        print(f"  {label:<16}{c['adapter']:>15,}  (rank {a.rank} on every linear of the blocks)")
        print(
            f"  trainable       {c['trainable']:>15,}  ({c['trainable'] / 1e6:.1f}M: adapters, embedding, norms, head)"
        )
        print(f"  frozen          {c['frozen']:>15,}  (the blocks' linear weights)")
        rows = ADAPTER_TABLE_ROWS
    if budget is not None:
        print(f"  {budget.describe()}")
    print_state_bytes_table(cfg, model, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
