"""Optional on-the-fly mode: same windows as prepared data in stream order, exact resume, ranks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from data import DataConfig, DataError
from data.streaming import StreamingBatches
from tests.helpers.corpus import make_texts, tiny_tokenizer, write_corpus
from data.tokenizer import load_tokenizer

SEQ, GB = 16, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    texts = make_texts(40, seed=51)
    tok = tiny_tokenizer(root / "tiny.model", texts)
    corpus = write_corpus(root / "c", texts, texts[:3], train_shards=3)
    sp = load_tokenizer(tok)
    stream = np.array([i for t in texts for i in sp.encode(t) + [1]], dtype=np.int64)
    return DataConfig(tokenizer=str(tok), seq_len=SEQ), str(corpus), stream


def take(it, n):
    return list(itertools.islice(it, n))


def test_windows_follow_the_token_stream_across_passes(setup):
    cfg, corpus, stream = setup
    sb = StreamingBatches(cfg, corpus, global_batch=GB)
    steps = len(stream) // (GB * SEQ) + 3  # runs into the second pass over the source
    looped = np.concatenate([stream, stream])
    for s, (x, y) in enumerate(take(sb.batches(0), steps)):
        for r in range(GB):
            k = s * GB + r
            np.testing.assert_array_equal(x[r].numpy(), looped[k * SEQ : k * SEQ + SEQ])
            np.testing.assert_array_equal(y[r].numpy(), looped[k * SEQ + 1 : k * SEQ + SEQ + 1])


def test_resume_from_state_and_by_replay(setup):
    cfg, corpus, stream = setup
    sb = StreamingBatches(cfg, corpus, global_batch=GB)
    full = take(sb.batches(0), 40)
    for step in (5, 33):  # 33 is in the second pass
        state = sb.state(step)
        assert isinstance(state["cursor"], str)
        fresh = StreamingBatches(cfg, corpus, global_batch=GB)
        for (a, b), (c, d) in zip(full[step:], take(fresh.batches(step, state), 4)):
            assert torch.equal(a, c) and torch.equal(b, d)
        replay = take(StreamingBatches(cfg, corpus, global_batch=GB).batches(step), 2)
        assert torch.equal(replay[0][0], full[step][0]) and torch.equal(replay[1][1], full[step + 1][1])
    with pytest.raises(DataError, match="does not match"):
        StreamingBatches(DataConfig(tokenizer=cfg.tokenizer, seq_len=8), corpus, global_batch=GB).check_resume(
            sb.state(5))


def test_ranks_slice_the_same_global_batch(setup):
    cfg, corpus, _ = setup
    whole = take(StreamingBatches(cfg, corpus, global_batch=GB).batches(2), 3)
    parts = [take(StreamingBatches(cfg, corpus, global_batch=GB, rank=r, world_size=2).batches(2), 3)
             for r in range(2)]
    for s in range(3):
        assert torch.equal(torch.cat([parts[0][s][0], parts[1][s][0]]), whole[s][0])
