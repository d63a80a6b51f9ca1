"""Two real ranks (gloo, tests/helpers/gloo.py): the gathered slices equal the 1-rank batch."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from data import DataConfig, TrainBatches
from tests.helpers.corpus import make_texts, prepare_quietly, tiny_tokenizer, write_corpus
from tests.helpers.gloo import run_ranks

STEPS, START, GLOBAL_BATCH = 3, 5, 6


def _rank_main(rank: int, world_size: int, cfg: DataConfig) -> None:
    tb = TrainBatches(cfg, global_batch=GLOBAL_BATCH, rank=rank, world_size=world_size)
    mine = list(itertools.islice(tb.batches(START), STEPS))
    for step, (x, y) in enumerate(mine):
        assert x.shape == (GLOBAL_BATCH // world_size, cfg.seq_len)
        xs = [torch.empty_like(x) for _ in range(world_size)]
        ys = [torch.empty_like(y) for _ in range(world_size)]
        dist.all_gather(xs, x)
        dist.all_gather(ys, y)
        if rank == 0:
            ref_x, ref_y = next(TrainBatches(cfg, global_batch=GLOBAL_BATCH).batches(START + step))
            assert torch.equal(torch.cat(xs), ref_x), f"step {START + step}: gathered inputs differ"
            assert torch.equal(torch.cat(ys), ref_y), f"step {START + step}: gathered targets differ"


def test_two_gloo_ranks_gather_to_the_single_rank_batch(tmp_path):
    train = make_texts(80, seed=21)
    tok = tiny_tokenizer(tmp_path / "tiny.model", train)
    corpus = write_corpus(tmp_path / "c", train, train[:5])
    out = tmp_path / "tokens"
    prepare_quietly(corpus, tok, out, shard_tokens=500, splits=("train",))
    cfg = DataConfig(prepared_dir=str(out), tokenizer=str(tok), seq_len=12, seed=5)
    run_ranks(_rank_main, 2, cfg)
