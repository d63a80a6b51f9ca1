"""manifest.json of a prepared token directory: its format, reading it, and how to rebuild it.

Written once by preparation (data/preparation/manifest_writer.py), read by every run
(data/loading/prepared_split.py) and by preparation itself when resuming.

    {
      "format": "memopt-lm-tokens", "format_version": 1, "tool_version": "...",
      "dtype": "uint16",
      "tokenizer": {"path": ..., "sha256": ..., "vocab_size": 32000, "eos_id": 1, "pad_id": 0},
      "splits": {
        "train": {"tokens": N, "docs": D, "skipped": {"invalid_json": 0, ...},
                  "source": {...}, "limits": {...}, "checksum": sha256,
                  "shards": [{"file": "train-00000.bin", "tokens": n, "docs": d, "sha256": ...}, ...]},
        "validation": {...}
      },
      "checksum": sha256 over the splits' checksums
    }

A split's checksum is a sha256 over its shards' content hashes, token counts and the
dtype/tokenizer, so it changes whenever the token stream could differ. Beside the
manifest, `<split>.prepare.json` records each split's preparation settings (state_path).

read_manifest refuses a manifest that is missing, not JSON (e.g. truncated), of another
format or missing fields; check_checksums refuses one whose checksums do not match its
shard entries (edited sha256 values). Every such error names the file and ends with
rebuild_hint: the prepare_data.py command that rebuilds the directory, reconstructed from
the recorded settings (the manifest's, or the `<split>.prepare.json` files' when the
manifest itself is unreadable).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shlex

from data.config import DataConfig
from data.errors import DataError
from data.files import read_json, sha256_file
from data.paths import sample_corpus_dir, t5_tokenizer_path

FORMAT = "memopt-lm-tokens"
FORMAT_VERSION = 1
TOOL_VERSION = "memopt-lm-data 1.0"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
DEFAULT_SHARD_TOKENS = 100_000_000
"""tools/prepare_data.py's --shard_tokens default."""
DTYPES = ("uint16", "uint32")


def state_path(out: pathlib.Path, split: str) -> pathlib.Path:
    """`<split>.prepare.json`: the split's settings (resume refuses others) and, once complete, its manifest entry."""
    return out / f"{split}.prepare.json"


def read_record(out: pathlib.Path, split: str) -> dict | None:
    """The split's `<split>.prepare.json`, or None when it is missing, unreadable or malformed (no settings
    key with a tokenizer sha256, or complete without an entry)."""
    record = read_json(state_path(out, split))
    if not (
        isinstance(record, dict)
        and isinstance(record.get("key"), dict)
        and isinstance(record["key"].get("tokenizer_sha256"), str)
        and (not record.get("complete") or isinstance(record.get("entry"), dict))
    ):
        return None
    return record


def split_checksum(dtype: str, tokenizer_sha256: str, shards: list[dict]) -> str:
    payload = json.dumps(
        {
            "dtype": dtype,
            "tokenizer": tokenizer_sha256,
            "shards": [[s["tokens"], s["docs"], s["sha256"]] for s in shards],
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def overall_checksum(splits: dict) -> str:
    payload = json.dumps({name: s["checksum"] for name, s in sorted(splits.items())}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def read_manifest(prepared_dir: pathlib.Path) -> dict:
    """The manifest, or a DataError naming the file and saying how to make or rebuild it."""
    path = prepared_dir / MANIFEST
    if not path.is_file():
        what = "directory" if not prepared_dir.is_dir() else "manifest"
        raise DataError(
            f"prepared data {what} missing: {path} not found. Fix: run "
            "`python tools/prepare_data.py` (sample corpus; `make data`), or "
            f"`python tools/prepare_data.py --source <C4 dir or hf> --out {prepared_dir}`, "
            "or point data.prepared_dir at an existing prepared directory."
        )
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc}). Fix: make it readable for this user.") from exc
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise DataError(
            f"{path} is not valid JSON ({exc}): the manifest is truncated or damaged. {rebuild_hint(prepared_dir)}"
        ) from exc
    if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("format_version")) != (
        FORMAT,
        FORMAT_VERSION,
    ):
        raise DataError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest. {rebuild_hint(prepared_dir)}")
    problem = _layout_problem(manifest)
    if problem:
        raise DataError(f"{path} is damaged: {problem}. {rebuild_hint(prepared_dir)}")
    return manifest


def is_count(x: object) -> bool:
    """A non-negative int (not a bool): a token, document or skip count in a manifest or shard sidecar."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def is_sha256(x: object) -> bool:
    """A sha256 hex digest as the manifests and sidecars write it."""
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


def _layout_problem(m: dict) -> str | None:
    """What is missing or malformed in a manifest of the right format (None: nothing)."""
    if m.get("dtype") not in DTYPES:
        return f"dtype {m.get('dtype')!r} is not one of {', '.join(DTYPES)}"
    tok = m.get("tokenizer")
    if not (isinstance(tok, dict) and is_sha256(tok.get("sha256")) and is_count(tok.get("vocab_size"))):
        return "the tokenizer entry lacks a sha256 or vocab_size"
    splits = m.get("splits")
    if not isinstance(splits, dict) or not is_sha256(m.get("checksum")):
        return "the splits or the checksum are missing"
    for name, info in splits.items():
        if not (isinstance(info, dict) and is_sha256(info.get("checksum")) and isinstance(info.get("shards"), list)):
            return f"split {name!r} lacks its checksum or shard list"
        if not is_count(info.get("tokens")):
            return f"split {name!r} lacks its token count"
        for shard in info["shards"]:
            if not isinstance(shard, dict):
                return f"split {name!r} has a shard entry that is not an object"
            file = shard.get("file")
            if not (isinstance(file, str) and file and pathlib.PurePath(file).name == file and file not in (".", "..")):
                return f"split {name!r} has a shard entry without a plain file name ({file!r})"
            if not (is_count(shard.get("tokens")) and is_count(shard.get("docs")) and is_sha256(shard.get("sha256"))):
                return f"the entry of shard {file} lacks its tokens, docs or sha256"
    return None


def check_checksums(manifest: dict, prepared_dir: pathlib.Path) -> None:
    """The manifest agrees with itself: each split's checksum and token count match its shard entries
    (so an edited shard sha256 is caught here, before it could vouch for an edited shard), and the
    overall checksum matches the splits'. Reads no shard."""
    path = prepared_dir / MANIFEST
    for name, info in manifest["splits"].items():
        expected = split_checksum(manifest["dtype"], manifest["tokenizer"]["sha256"], info["shards"])
        if info["checksum"] != expected:
            raise DataError(
                f"{path}: the {name!r} split's checksum does not match its shard entries (their sha256 values, "
                "token or document counts were edited or damaged after preparation), so the manifest cannot vouch "
                f"for the shards. {rebuild_hint(prepared_dir, manifest)}"
            )
        counted = sum(s["tokens"] for s in info["shards"])
        if info["tokens"] != counted:
            raise DataError(
                f"{path}: the {name!r} split claims {info['tokens']} tokens but its shard entries add up to "
                f"{counted}. {rebuild_hint(prepared_dir, manifest)}"
            )
    if manifest["checksum"] != overall_checksum(manifest["splits"]):
        raise DataError(
            f"{path}: the overall checksum does not match the splits' checksums (edited or damaged after "
            f"preparation). {rebuild_hint(prepared_dir, manifest)}"
        )


def split_info(manifest: dict, split: str, prepared_dir: pathlib.Path) -> dict:
    info = manifest["splits"].get(split)
    if info is None:
        raise DataError(
            f"{prepared_dir} has no prepared {split!r} split (has: {sorted(manifest['splits'])}). Fix: "
            f"run `python tools/prepare_data.py --split {split} --out {prepared_dir} --source <same source>`."
        )
    return info


def changed_source_files(source: object) -> list[str]:
    """The local files of a split's recorded source (a manifest entry's or a split record's "source") that are
    still there but no longer the size they had when the split was prepared, each as 'path (N bytes then, M
    now)'. A file that is gone counts as unchanged: raw data is often deleted once prepared. Only sizes are
    compared (no hashing at run time), so a same-size rewrite goes unseen; a different size is certain change
    (e.g. a sample corpus of a newer recipe)."""
    if not (isinstance(source, dict) and source.get("kind") == "local"):
        return []
    files, sizes = source.get("files"), source.get("sizes")
    if not (isinstance(files, list) and isinstance(sizes, list) and len(files) == len(sizes)):
        return []
    changed = []
    for name, size in zip(files, sizes, strict=True):
        try:
            now = os.stat(name).st_size
        except (OSError, TypeError, ValueError):
            continue
        if now != size:
            changed.append(f"{name} ({size} bytes then, {now} now)")
    return changed


# --- The rebuild command -------------------------------------------------------------------


def rebuild_hint(prepared_dir: pathlib.Path, manifest: dict | None = None) -> str:
    """'Fix: ...' for damaged prepared data: the preparation command, and why re-running it repairs.

    Preparation re-hashes its finished shards against their records when it resumes, redoes a
    damaged one (and those after it: shards continue each other's source position) and rewrites
    manifest.json, so re-running the original command is the repair.
    """
    command, note = rebuild_command(prepared_dir, manifest)
    return (
        f"Fix: re-run the preparation command `{command}`{note}: it re-hashes the finished shards, redoes a "
        "damaged one and those after it, and rewrites manifest.json. Or point data.prepared_dir at an intact copy."
    )


def rebuild_command(prepared_dir: pathlib.Path, manifest: dict | None = None) -> tuple[str, str]:
    """(`python tools/prepare_data.py ...` that rebuilds prepared_dir, a note on what it could not reconstruct).

    The settings come from the manifest when given (it records each split's source and limits and the
    tokenizer path), else from the `<split>.prepare.json` records; options left at their defaults are
    left out. With neither, only --out is known.
    """
    settings = _settings_from_manifest(manifest) if manifest is not None else _settings_from_records(prepared_dir)
    out = ["--out", str(prepared_dir)]
    if not settings:
        return _command(out), " with the same --source, --tokenizer and limits as when it was prepared"
    notes: list[str] = []
    common = {split: _common_args(split, s, notes) for split, s in settings.items()}
    specific = {split: _split_args(split, s, notes) for split, s in settings.items()}
    if len(settings) == len(SPLITS) and len({tuple(a) for a in common.values()}) == 1:
        args = common["train"] + out + specific["train"] + specific["validation"]
        command = _command(args)
    else:
        command = " && ".join(_command(common[s] + ["--split", s] + out + specific[s]) for s in settings)
    return command, "".join(f" ({n})" for n in dict.fromkeys(notes))


def _command(args: list[str]) -> str:
    return shlex.join(["python", "tools/prepare_data.py", *args])


def _settings_from_manifest(manifest: dict) -> dict[str, dict]:
    out = {}
    for split in SPLITS:
        info = manifest.get("splits", {}).get(split)
        if isinstance(info, dict):
            limits = info.get("limits") or {}
            out[split] = {
                "source": info.get("source") or {},
                "max_tokens": limits.get("max_tokens"),
                "max_docs": limits.get("max_docs"),
                "shard_tokens": limits.get("shard_tokens"),
                "tokenizer_path": (manifest.get("tokenizer") or {}).get("path"),
                "tokenizer_sha256": None,
            }
    return out


def _settings_from_records(prepared_dir: pathlib.Path) -> dict[str, dict]:
    out = {}
    for split in SPLITS:
        record = read_record(prepared_dir, split)
        if record is None:
            continue
        try:
            key = record["key"]
            out[split] = {
                "source": key["source"],
                "max_tokens": key["max_tokens"],
                "max_docs": key["max_docs"],
                "shard_tokens": key["shard_tokens"],
                "tokenizer_path": record.get("tokenizer_path"),  # not in records written before it was added
                "tokenizer_sha256": key["tokenizer_sha256"],
            }
        except KeyError:  # a record without one of these settings: its split is left out
            continue
    return out


def _common_args(split: str, s: dict, notes: list[str]) -> list[str]:
    """--source/--reader/--shard_tokens/--tokenizer of one split's recorded settings."""
    args: list[str] = []
    source = s["source"] if isinstance(s["source"], dict) else {}
    if source.get("kind") == "hf":
        args += ["--source", "hf"]
    elif source.get("kind") == "local" and source.get("files"):
        files = [str(f) for f in source["files"]]
        folder = os.path.commonpath([os.path.dirname(f) or "." for f in files])
        if not _finds_exactly(folder, split, files):
            notes.append(
                f"--source as when it was prepared: the {split} split was read from {len(files)} file(s) such as "
                f"{files[0]}"
            )
        if not _inside(folder, sample_corpus_dir()):  # the sample corpus is --source's default
            args += ["--source", folder]
        if source.get("reader", "gzip") != "gzip":
            args += ["--reader", str(source["reader"])]
    else:
        notes.append("with the same --source as when it was prepared")
        args += ["--source", "<same source>"]
    if s["shard_tokens"] not in (None, DEFAULT_SHARD_TOKENS):
        args += ["--shard_tokens", str(s["shard_tokens"])]
    path, sha = s["tokenizer_path"], s["tokenizer_sha256"]
    if path is not None:
        if not _is_t5(pathlib.Path(path)):
            args += ["--tokenizer", str(path)]
    elif sha is not None and not _t5_has_sha(sha):
        args += ["--tokenizer", f"<the .model with sha256 {sha[:12]}...>"]
    return args


def _split_args(split: str, s: dict, notes: list[str]) -> list[str]:
    """--max_tokens/--max_docs (train) or --val_tokens (validation) of one split's recorded settings."""
    if split == "validation":
        n = s["max_tokens"]
        if n is None:
            notes.append("the validation split was prepared without a token limit, which this command cannot give")
        return [] if n in (None, DataConfig.val_tokens) else ["--val_tokens", str(n)]
    args = []
    if s["max_tokens"] is not None:
        args += ["--max_tokens", str(s["max_tokens"])]
    if s["max_docs"] is not None:
        args += ["--max_docs", str(s["max_docs"])]
    return args


def _finds_exactly(folder: str, split: str, files: list[str]) -> bool:
    """Whether `--source folder` would read exactly these files (as tools/prepare_data.py searches a folder)."""
    try:
        found = sorted(str(p) for p in pathlib.Path(folder).rglob(f"c4-{split}.*.json.gz"))
    except OSError:
        return False
    return found == sorted(files)


def _inside(path: str, folder: pathlib.Path) -> bool:
    try:
        return pathlib.Path(path).resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _is_t5(path: pathlib.Path) -> bool:
    return path.parts[-3:] == ("tokenizers", "t5", "spiece.model")


def _t5_has_sha(sha: str) -> bool:
    t5 = t5_tokenizer_path()
    return t5.is_file() and sha256_file(t5) == sha
