"""Run time: prepared token shards -> training and validation batches.

    prepared_split.py      open a prepared split, every check done up front (manifest,
                           tokenizer identity, dtype, then verify.py)
    verify.py              the split's shard files as data.verify says: sizes, sha256 and
                           token-id range, with a cache of files already hashed
    token_store.py         random access into a split's token stream (memory-mapped shards)
    window_order.py        the windows and which of them make up the global batch at a step
    train_batches.py       TrainBatches: this rank's batches, step by step, through a DataLoader
    validation_batches.py  the fixed, in-order validation batches

Import TrainBatches / validation_batches from `data`. This package's __init__ imports
nothing, so importing one of its modules never drags in torch unless that module needs it.
"""
