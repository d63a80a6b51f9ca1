"""The C4 on-disk format: gzip'd JSON lines with `text`, `timestamp`, `url`.

Files are named like the originals in allenai/c4 (`en/c4-train.00000-of-01024.json.gz`,
`en/c4-validation.00000-of-00008.json.gz`). This module writes such shards (for the
sample corpus and tests) and reads them with a plain gzip+json reader that sorts bad
input into kinds instead of crashing or silently dropping data:

- invalid JSON line, record without a string `text`, line that is not UTF-8:
  skipped and counted (one broken record must not kill a multi-hour job; the counts
  are reported in the summary and the manifest);
- corrupt / truncated gzip stream: stop with an error naming the file. The rest of
  that file is unreadable, so continuing would silently drop an unknown number of
  documents; the shard being written is left as a temp file and never finalized.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import re
import zlib
from collections.abc import Iterator

from data.errors import DataError
from data.files import partial_path

_NAME = re.compile(r"c4-(train|validation)\.(\d+)-of-(\d+)\.json\.gz$")

# Kinds of skipped input records (keys of the "skipped" counters).
INVALID_JSON = "invalid_json"
MISSING_TEXT = "missing_text"
NOT_UTF8 = "not_utf8"


def shard_name(split: str, index: int, total: int) -> str:
    return f"c4-{split}.{index:05d}-of-{total:05d}.json.gz"


def split_of(path: str | os.PathLike) -> str | None:
    """ "train"/"validation" from a C4 file name, None if it is not named like one."""
    m = _NAME.search(pathlib.Path(path).name)
    return m.group(1) if m else None


def write_shards(records: list[dict], out_dir: pathlib.Path, split: str, n_shards: int) -> list[pathlib.Path]:
    """Write records as n_shards contiguous, byte-reproducible C4 shards (gzip mtime=0)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    per = -(-len(records) // n_shards)
    for i in range(n_shards):
        path = out_dir / shard_name(split, i, n_shards)
        tmp = partial_path(path)
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            for rec in records[i * per : (i + 1) * per]:
                gz.write(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def iter_records(path: str | os.PathLike, start_line: int = 0) -> Iterator[tuple[int, str | None, str | None]]:
    """(line_no, text, skip_kind) for each non-blank line from start_line on.

    Exactly one of text / skip_kind is None. Raises DataError on a corrupt gzip stream.
    """
    line_no = -1
    try:
        with gzip.open(path, "rb") as gz:
            for line_no, raw in enumerate(gz):
                if line_no < start_line or not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield line_no, None, NOT_UTF8
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    yield line_no, None, INVALID_JSON
                    continue
                text = rec.get("text") if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    yield line_no, None, MISSING_TEXT
                    continue
                yield line_no, text, None
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(
            f"{path}: corrupt or truncated gzip data after line {line_no + 1} ({exc}). The rest of this "
            "file cannot be read, so preparation stopped instead of writing a silently truncated shard "
            "(finished shards are kept). Fix: re-download this file (or remove it from --source) and re-run."
        ) from exc
