"""Offline preparation: C4-format text -> token shards + manifest.json (tools/prepare_data.py).

    sources.py              where documents come from: local C4 shards or the HF hub
    c4_format.py            the C4 on-disk format (gzip'd JSON lines): read, and write for the sample corpus
    encoding.py             tokenization in worker processes, results in input order
    shard_files.py          token shard files and their sidecars: writing, and finding the finished ones
    manifest_writer.py      the manifest's checksums and writing manifest.json
    prepare.py              the driver: splits -> shards -> manifest, resumable
    tokenizer_training.py   training a SentencePiece model with the ids the pipeline expects

Nothing here imports torch: the tools and their worker processes stay light.
"""
