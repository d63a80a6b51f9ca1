"""TrainBatches / validation_batches: order, ranks, workers, resume, epochs, errors."""

from __future__ import annotations

import itertools
import json
import shutil
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import data.loading.prepared_split as prepared_mod
from data import DataConfig, DataError, DataWarning, TrainBatches, validation_batches
from data.loading.token_store import TokenStore
from data.loading.window_order import WindowOrder, epoch_permutation
from tests.helpers.corpus import make_texts, prepare_quietly, split_tokens, tiny_tokenizer, write_corpus

SEQ = 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small prepared dir with several shards (so windows cross shard boundaries)."""
    root = tmp_path_factory.mktemp("batches")
    train, val = make_texts(150, seed=3), make_texts(30, seed=4)
    tok = tiny_tokenizer(root / "tiny.model", train + val)
    corpus = write_corpus(root / "corpus", train, val)
    out = root / "tokens"
    prepare_quietly(corpus, tok, out, shard_tokens=997)
    return tok, out


def cfg_for(prepared, **kw) -> DataConfig:
    tok, out = prepared
    return DataConfig(prepared_dir=str(out), tokenizer=str(tok), seq_len=kw.pop("seq_len", SEQ), **kw)


def take(tb: TrainBatches, start: int, n: int):
    return list(itertools.islice(tb.batches(start), n))


def test_batches_are_the_documented_windows(prepared):
    _, out = prepared
    cfg = cfg_for(prepared, seed=7)
    tb = TrainBatches(cfg, global_batch=8)
    tokens = split_tokens(out, "train")
    assert len(json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]) > 3
    assert tb.n_windows == (len(tokens) - 1) // SEQ
    assert tb.tokens_per_step == 8 * SEQ
    order = np.concatenate([epoch_permutation(7, e, tb.n_windows) for e in range(2)])
    for step, (x, y) in enumerate(take(tb, 0, 5)):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, SEQ)
        for row in range(8):
            w = order[step * 8 + row]
            np.testing.assert_array_equal(x[row].numpy(), tokens[w * SEQ : w * SEQ + SEQ])
            np.testing.assert_array_equal(y[row].numpy(), tokens[w * SEQ + 1 : w * SEQ + SEQ + 1])


def test_global_batch_independent_of_world_size(prepared):
    cfg = cfg_for(prepared)
    whole = take(TrainBatches(cfg, global_batch=8), 3, 4)
    ranks = [take(TrainBatches(cfg, global_batch=8, rank=r, world_size=2), 3, 4) for r in range(2)]
    for step in range(4):
        assert ranks[0][step][0].shape == (4, SEQ)
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), whole[step][0])
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), whole[step][1])
    assert not torch.equal(ranks[0][0][0], ranks[1][0][0])


def test_dataloader_workers_do_not_change_batches(prepared):
    b0 = take(TrainBatches(cfg_for(prepared, num_workers=0), global_batch=4), 0, 6)
    b2 = take(TrainBatches(cfg_for(prepared, num_workers=2), global_batch=4), 0, 6)
    for (x0, y0), (x2, y2) in zip(b0, b2, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


class _WorkerSignals(Dataset):
    """Each item: whether SIGINT and SIGTERM are ignored in the process that produced it."""

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.tensor(signal.getsignal(signal.SIGINT) == signal.SIG_IGN),
            torch.tensor(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN),
        )


def test_dataloader_workers_ignore_stop_signals(prepared, monkeypatch):
    """A Ctrl-C or preemption sent to the process group must not kill a worker mid-step (the main process saves)."""
    tb = TrainBatches(cfg_for(prepared, num_workers=1), global_batch=2)
    monkeypatch.setattr(tb, "dataset", _WorkerSignals())
    ignores_int, ignores_term = next(tb.batches(0))
    assert bool(ignores_int) and bool(ignores_term)


def test_resume_equals_tail_of_uninterrupted_stream(prepared):
    tb = TrainBatches(cfg_for(prepared), global_batch=8)
    full = take(tb, 0, 12)
    state, step = tb.state_dict(), 7  # the trainer's checkpoint holds the step once, beside the data state
    resumed_tb = TrainBatches(cfg_for(prepared), global_batch=8)
    resumed_tb.load_state_dict(state)
    resumed = take(resumed_tb, step, 5)
    for (a, b), (c, d) in zip(full[7:], resumed, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_state_dict_is_the_order_identity_and_load_catches_changes(prepared, tmp_path):
    tb = TrainBatches(cfg_for(prepared), global_batch=8)
    state = tb.state_dict()
    assert all(isinstance(v, (str, int, float)) for v in state.values())
    assert set(state) == {"manifest_checksum", "n_windows", "seed", "seq_len", "global_batch", "permutation"}
    assert state["n_windows"] == tb.n_windows and state["seed"] == 1234 and state["global_batch"] == 8
    assert state["seq_len"] == SEQ
    assert state == TrainBatches(cfg_for(prepared), global_batch=8, rank=1, world_size=2).state_dict()  # any rank
    torch.save({"data": state}, tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["data"] == state
    tb.load_state_dict(state)
    for kw, gb in [({"seed": 99}, 8), ({"seq_len": 32}, 8), ({}, 16)]:
        with pytest.raises(DataError, match="data changed since this checkpoint.*Fix"):
            TrainBatches(cfg_for(prepared, **kw), global_batch=gb).load_state_dict(state)
    with pytest.raises(DataError, match="manifest_checksum"):
        tb.load_state_dict({**state, "manifest_checksum": "0" * 64})


def test_load_state_dict_refuses_a_numpy_that_permutes_differently(prepared, monkeypatch):
    """Same data and config, but numpy's RNG draws another order (as after a numpy upgrade): refused."""
    state = TrainBatches(cfg_for(prepared), global_batch=8).state_dict()
    real_default_rng = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda seed: real_default_rng([*seed, 1]))
    other = TrainBatches(cfg_for(prepared), global_batch=8)
    assert {k: v for k, v in other.state_dict().items() if k != "permutation"} == {
        k: v for k, v in state.items() if k != "permutation"
    }
    with pytest.raises(DataError, match="data changed since this checkpoint.*permutation: checkpoint"):
        other.load_state_dict(state)


def test_batches_leave_torchs_global_rng_alone(prepared):
    """Starting the batch iterator (as a resumed run does after restoring the RNG) draws no global random number."""
    tb = TrainBatches(cfg_for(prepared), global_batch=4)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    next(tb.batches(3))
    assert torch.equal(torch.get_rng_state(), before)


def test_load_state_dict_accepts_older_checkpoints_data_state(prepared):
    """Checkpoints written before the component API carry the step and its position in the data state."""
    tb = TrainBatches(cfg_for(prepared), global_batch=8)
    step = 123
    legacy = {
        **tb.state_dict(),
        "step": step,
        "epoch": step * 8 // tb.n_windows,
        "position": step * 8,
        "tokens_seen": step * tb.tokens_per_step,
    }
    tb.load_state_dict(legacy)
    with pytest.raises(DataError, match="data changed since this checkpoint.*seed: checkpoint 1234 != now 99"):
        TrainBatches(cfg_for(prepared, seed=99), global_batch=8).load_state_dict(legacy)


def test_epoch_rollover_on_tiny_dataset(prepared, tmp_path):
    """3 epochs over a few windows: each epoch is a permutation covering every window once."""
    tok, _ = prepared
    texts = make_texts(6, seed=5, min_words=8, max_words=12)
    corpus = write_corpus(tmp_path / "c", texts, texts[:1], train_shards=2)
    out = tmp_path / "tokens"
    prepare_quietly(corpus, tok, out, shard_tokens=30, splits=("train",))
    seq = 8
    cfg = DataConfig(prepared_dir=str(out), tokenizer=str(tok), seq_len=seq, seed=11)
    tb = TrainBatches(cfg, global_batch=3)
    n = tb.n_windows
    tokens = split_tokens(out, "train")
    assert 6 <= n < 40
    windows = {tuple(tokens[w * seq : w * seq + seq + 1]) for w in range(n)}
    rows = [row for x, y in take(tb, 0, n) for row in torch.cat([x, y[:, -1:]], 1).tolist()]  # 3n rows = 3 epochs
    epochs = [rows[e * n : (e + 1) * n] for e in range(3)]
    for e, epoch in enumerate(epochs):
        assert sorted(map(tuple, epoch)) == sorted(windows), f"epoch {e} is not a permutation of the windows"
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled per epoch
    # Resuming in the middle of epoch 2 matches.
    step = (2 * n) // 3 + 1
    assert take(tb, step, 1)[0][0].tolist() == [r[:-1] for r in rows[step * 3 : step * 3 + 3]]
    assert (step * 3) // n == 2 and (step * 3) % n  # the resumed step starts inside epoch 2, not at its start


def test_window_order_keeps_only_the_last_epochs_permutations():
    """A long run over a few windows passes many epochs: the cache stays at `cache` permutations (the newest)."""
    order = WindowOrder(5, seed=3, cache=2)
    ids = order.windows(0, 50)  # epochs 0..9
    for e in range(10):
        assert sorted(ids[e * 5 : e * 5 + 5].tolist()) == [0, 1, 2, 3, 4]
    assert sorted(order._perms) == [8, 9]


def _write_shards(tmp_path, parts: list[np.ndarray], dtype: str) -> dict:
    """Shard files written with numpy's tofile, and the split entry that lists them."""
    shards = []
    for i, part in enumerate(parts):
        name = f"s{i}.bin"
        part.astype(dtype).tofile(tmp_path / name)
        shards.append({"file": name, "tokens": len(part)})
    return {"shards": shards}


def test_token_store_reads_across_shards_to_the_last_token(tmp_path):
    """uint32 ids above 65535, an empty shard in the middle, reads crossing boundaries and ending at the last token."""
    parts = [np.arange(70000, 70007), np.array([], dtype=np.int64), np.arange(5), np.arange(90000, 90004)]
    stream = np.concatenate(parts)
    store = TokenStore(tmp_path, _write_shards(tmp_path, parts, "uint32"), "uint32")
    assert store.n_tokens == 16
    np.testing.assert_array_equal(store.read(0, 16), stream)
    for start, length in [(0, 7), (7, 5), (5, 9), (12, 4), (15, 1), (3, 0)]:
        np.testing.assert_array_equal(store.read(start, length), stream[start : start + length])
    for start, length in [(-1, 2), (15, 2), (16, 1)]:
        with pytest.raises(IndexError, match=f"token range \\[{start}, {start + length}\\) outside the stream of 16"):
            store.read(start, length)


def test_validation_batches_fixed_and_in_order(prepared):
    tok, out = prepared
    val = split_tokens(out, "validation")
    cfg = cfg_for(prepared, val_tokens=200)
    a, b = validation_batches(cfg, 5), validation_batches(cfg, 5)
    assert [len(x) for x, _ in a] == [5, 5, 2]  # (200-1)//16 = 12 windows, in batches of 5
    for (x, y), (x2, y2) in zip(a, b, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    x = torch.cat([x for x, _ in a])
    assert x.shape == (12, SEQ)
    np.testing.assert_array_equal(x.reshape(-1).numpy(), val[: 12 * SEQ])
    np.testing.assert_array_equal(torch.cat([y for _, y in a]).reshape(-1).numpy(), val[1 : 12 * SEQ + 1])
    with pytest.warns(DataWarning, match="evaluating on all"):
        big = validation_batches(cfg_for(prepared, val_tokens=10**9), 5)
    assert sum(len(x) for x, _ in big) == (len(val) - 1) // SEQ


def test_missing_prepared_dir_names_the_fix(prepared, tmp_path):
    tok, _ = prepared
    cfg = DataConfig(prepared_dir=str(tmp_path / "nope"), tokenizer=str(tok))
    with pytest.raises(DataError, match="missing.*prepare_data.py"):
        TrainBatches(cfg, global_batch=2)
    with pytest.raises(DataError, match="missing.*prepare_data.py"):
        validation_batches(cfg, 2)


def test_tokenizer_errors_name_the_fix(prepared, tmp_path, monkeypatch):
    _, out = prepared
    with pytest.raises(DataError, match="not found.*train_tokenizer.py"):
        TrainBatches(DataConfig(prepared_dir=str(out), tokenizer=str(tmp_path / "x.model")), global_batch=2)
    monkeypatch.setenv("MEMOPT_CACHE", str(tmp_path / "emptycache"))
    with pytest.raises(DataError, match="T5 tokenizer not found.*fetch_assets.py"):
        TrainBatches(DataConfig(prepared_dir=str(out), tokenizer="t5"), global_batch=2)
    other = tiny_tokenizer(tmp_path / "other.model", make_texts(50, seed=9), vocab_size=380)
    for fn in (lambda c: TrainBatches(c, global_batch=2), lambda c: validation_batches(c, 2)):
        with pytest.raises(DataError, match="different tokenizer.*Fix"):
            fn(DataConfig(prepared_dir=str(out), tokenizer=str(other), seq_len=SEQ))


def test_config_errors(prepared, tmp_path):
    with pytest.raises(DataError, match="not divisible by world_size"):
        TrainBatches(cfg_for(prepared), global_batch=6, world_size=4)
    with pytest.raises(DataError, match="too few for one window.*Fix"):
        TrainBatches(cfg_for(prepared, seq_len=10**7), global_batch=2)
    with pytest.raises(DataError, match=r"^rank=2 outside \[0, world_size=2\)$"):
        TrainBatches(cfg_for(prepared), global_batch=8, rank=2, world_size=2)
    with pytest.raises(DataError, match="^batch_size must be >= 1, got 0$"):
        validation_batches(cfg_for(prepared), 0)


def test_vocab_must_fit_dtype(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(prepared_mod, "token_dtype", lambda v: np.dtype(np.uint32))  # as if vocab >= 65536
    with pytest.raises(DataError, match="does not fit the uint16.*Fix"):
        TrainBatches(cfg_for(prepared), global_batch=2)


def test_damaged_shard_is_detected(prepared, tmp_path):
    _, out = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = sorted(copy.glob("train-*.bin"))[1]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="damaged.*prepare_data.py"):
        TrainBatches(DataConfig(prepared_dir=str(copy), tokenizer=str(prepared[0]), seq_len=SEQ), global_batch=2)


def test_order_is_numpys_permutation_of_data_seed_and_epoch(prepared):
    """window_order's recipe, recomputed with numpy itself (not the module's epoch_permutation): epoch e is
    default_rng([data.seed, e]).permutation(n_windows), so another data.seed gives another order."""
    _, out = prepared
    tokens = split_tokens(out, "train")
    firsts = {}
    for seed in (7, 8):
        tb = TrainBatches(cfg_for(prepared, seed=seed), global_batch=8)
        n = tb.n_windows
        step = -(-n // 8) + 1  # a step wholly inside epoch 1
        expected = {
            0: np.random.default_rng([seed, 0]).permutation(n)[:8],
            step: np.random.default_rng([seed, 1]).permutation(n)[step * 8 - n : step * 8 - n + 8],
        }
        for s, windows in expected.items():
            x, y = take(tb, s, 1)[0]
            for row, w in enumerate(windows):
                np.testing.assert_array_equal(x[row].numpy(), tokens[w * SEQ : w * SEQ + SEQ])
                np.testing.assert_array_equal(y[row].numpy(), tokens[w * SEQ + 1 : w * SEQ + SEQ + 1])
        firsts[seed] = take(tb, 0, 1)[0][0]
    assert not torch.equal(firsts[7], firsts[8])


@pytest.mark.parametrize("val_tokens", [12 * SEQ, 12 * SEQ + 1, 12 * SEQ + 2, 13 * SEQ + 1])
def test_validation_keeps_every_whole_window(prepared, val_tokens):
    """Brute force: every SEQ+1-token window at stride SEQ that fits in the first val_tokens tokens, none more."""
    _, out = prepared
    val = split_tokens(out, "validation")
    assert len(val) > val_tokens
    expected = [val[s : s + SEQ + 1] for s in range(0, val_tokens, SEQ) if s + SEQ + 1 <= val_tokens]
    batches = validation_batches(cfg_for(prepared, val_tokens=val_tokens), 5)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert len(x) == len(expected)
    for row_x, row_y, window in zip(x, y, expected, strict=True):
        np.testing.assert_array_equal(row_x.numpy(), window[:-1])
        np.testing.assert_array_equal(row_y.numpy(), window[1:])
