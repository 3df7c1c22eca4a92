"""Write samples into WebDataset tar shards plus a JSON index: the one shard format of the toolkit.

A shard set is `OUT/{prefix}-000000.tar, ...` and `OUT/{prefix}-index.json`:

    {"shards": [{"name": "train-000000.tar", "count": 10000}, ...],
     "num_samples": 25000, "class_names": ["cat", "dog"] or null,
     "pattern": "train-{000000..000002}.tar"}

Each sample in a shard holds `KEY.jpg` or `KEY.png` (the source file's bytes, not re-encoded),
`KEY.cls` (class index as ASCII digits) when labelled, `KEY.txt` (UTF-8) when captioned, and
`KEY.json` ({"captions": [...]}) when an image has several captions. The index is written last,
through a temporary file and os.replace, so a directory with an index holds a complete shard
set; a failed run removes its partial shards (and the folder, when it made it). The sources are
in sources.py (ImageFolder trees), unlabelled.py (plain folders, path lists) and captions.py
(caption lists), the demo set in demo.py, the command line in cli.py.
"""

import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from pretrain.errors import DataError

# Shards are written with this file time so that the same input gives byte-identical tars.
FIXED_MTIME = 0  # an int: a float mtime makes tarfile add a pax header to every member


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def index_name(prefix: str) -> str:
    return f"{prefix}-index.json"


def write_shards(
    samples: Iterable[dict],
    out_dir: str | Path,
    prefix: str = "train",
    max_count: int = 10000,
    max_size: int = 1 << 30,
    class_names: list[str] | None = None,
    total: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write `samples` into `out_dir/{prefix}-%06d.tar` and `out_dir/{prefix}-index.json`.

    Each sample is a dict: `__key__` (str without dots), one of `jpg`/`png` (encoded bytes),
    optionally `cls` (int), `txt` (str) and `json` (a JSON-serialisable dict). A shard is closed
    once it holds `max_count` samples or `max_size` bytes. `total` only sizes the progress bar.
    Returns the index dict.
    """
    if max_count < 1 or max_size < 1:
        raise DataError(f"max_count and max_size must be positive, got {max_count}, {max_size}")
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous_shards(out_dir, prefix, overwrite)

    written: list[dict] = []  # {"name", "count"} per closed shard, in order

    def record_closed_shard(path: str) -> None:
        written.append({"name": os.path.basename(path), "count": writer.count})

    pattern = str(out_dir / prefix).replace("%", "%%") + "-%06d.tar"
    writer = wds.ShardWriter(
        pattern,
        maxcount=max_count,
        maxsize=max_size,
        post=record_closed_shard,
        verbose=0,
        mtime=FIXED_MTIME,
    )
    bar = tqdm(
        total=total,
        desc=f"writing {prefix}",
        unit="img",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for sample in samples:  # (iterating the bar itself would close it, leaving its line)
            writer.write(_encode_sample(sample))
            bar.update(1)
        writer.close()
        if sum(shard["count"] for shard in written) == 0:
            raise DataError(f"no samples to write into {out_dir} (every input was skipped)")
        bar.close()
    except BaseException:
        bar.leave = False  # the error line stands alone
        bar.close()
        # Leave nothing half-written behind: no index, no partial shards.
        if getattr(writer, "tarstream", None) is not None:
            writer.tarstream.close()
        _remove_shards(out_dir, prefix)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise

    index = {
        "shards": written,
        "num_samples": sum(shard["count"] for shard in written),
        "class_names": list(class_names) if class_names is not None else None,
        "pattern": _brace_pattern(prefix, len(written)),
    }
    temporary = out_dir / f".{index_name(prefix)}.tmp"
    temporary.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(temporary, out_dir / index_name(prefix))
    return index


def _encode_sample(sample: dict) -> dict:
    key = sample["__key__"]
    if "." in key:  # webdataset splits "key.ext" at the first dot of the file name
        raise DataError(f"sample key must not contain '.': {key}")
    encoded = {"__key__": key}
    for field in ("jpg", "png"):
        if field in sample:
            encoded[field] = bytes(sample[field])
    if "cls" in sample:
        encoded["cls"] = str(int(sample["cls"])).encode("ascii")
    if "txt" in sample:
        encoded["txt"] = str(sample["txt"]).encode("utf-8")
    if "json" in sample:
        encoded["json"] = json.dumps(sample["json"], ensure_ascii=False).encode("utf-8")
    return encoded


def _existing_shards(out_dir: Path, prefix: str) -> list[Path]:
    own_name = re.compile(rf"^{re.escape(prefix)}-\d{{6}}\.tar$")
    return sorted(path for path in out_dir.iterdir() if own_name.match(path.name))


def _clear_previous_shards(out_dir: Path, prefix: str, overwrite: bool) -> None:
    index = out_dir / index_name(prefix)
    if not (_existing_shards(out_dir, prefix) or index.exists()):
        return
    if not overwrite:
        raise DataError(
            f"{out_dir} already holds '{prefix}' shards; choose another folder or prefix, "
            "or pass --overwrite"
        )
    _remove_shards(out_dir, prefix)


def _remove_shards(out_dir: Path, prefix: str) -> None:
    # The index goes first: a directory never has an index pointing at missing shards.
    (out_dir / index_name(prefix)).unlink(missing_ok=True)
    for path in _existing_shards(out_dir, prefix):
        path.unlink()


def _brace_pattern(prefix: str, num_shards: int) -> str:
    if num_shards == 1:
        return shard_name(prefix, 0)
    return f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"
