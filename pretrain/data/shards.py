"""Shard specs: what a user writes (paths, brace patterns, globs, folders, index files, URLs,
`pipe:` commands) -> the list of shard urls the loaders read, and sample counts from the
`*-index.json` files written beside the shards.
"""

import glob
import json
import os
import re
from collections.abc import Sequence

import braceexpand
import webdataset as wds

from pretrain.errors import DataError

URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
GLOB_CHARACTERS = re.compile(r"[*?\[]")


def expand_shards(spec: str | os.PathLike | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Turn a shard spec into a list of shard urls (local paths checked to exist).

    A spec is a comma-separated string (or a list, or one Path) of:
      - a tar path, a brace pattern `dir/train-{000000..000009}.tar`, or a glob `dir/*.tar`
      - a shard index `dir/train-index.json`, or a folder: its one `*-index.json`, else its `*.tar`
      - an http(s)/gs/hf/... URL, passed to webdataset's gopen as it is
      - `pipe:COMMAND` (a shell command writing a tar to stdout), only with allow_pipe
    """
    if isinstance(spec, os.PathLike):
        parts = [os.fspath(spec)]
    elif isinstance(spec, str):
        parts = _split_on_top_level_commas(spec)
    else:
        parts = [os.fspath(part) for part in spec]
    parts = [part.strip() for part in parts if part.strip()]
    if not parts:
        raise DataError("no shards given (the shard spec is empty)")
    urls = [url for part in parts for url in _expand_part(part, allow_pipe)]
    return urls


def _split_on_top_level_commas(spec: str) -> list[str]:
    """'a.tar,b-{0..3}.tar' -> ['a.tar', 'b-{0..3}.tar']; commas inside braces belong to them."""
    parts, depth, start = [], 0, 0
    for position, character in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(character, 0)
        if character == "," and depth == 0:
            parts.append(spec[start:position])
            start = position + 1
    parts.append(spec[start:])
    return parts


def refuse_pipe(url: str) -> None:
    raise DataError(
        f"pipe: shard specs run shell commands; set data.allow_pipe=true to allow them: {url}"
    )


def _expand_part(part: str, allow_pipe: bool) -> list[str]:
    if part.startswith("pipe:"):
        if not allow_pipe:
            refuse_pipe(part)
        return list(braceexpand.braceexpand(part))
    scheme = URL_SCHEME.match(part)
    if scheme and scheme.group(1) != "file":
        if scheme.group(1) not in wds.gopen_schemes:
            raise DataError(
                f"webdataset cannot open {scheme.group(1)}:// urls; use a pipe: spec "
                f"(e.g. 'pipe:aws s3 cp {part} -') with data.allow_pipe=true"
            )
        return list(braceexpand.braceexpand(part))
    if scheme:
        part = part[len("file://") :]

    found, missing = [], []
    for path in braceexpand.braceexpand(os.path.expanduser(part)):
        if GLOB_CHARACTERS.search(path):
            found.extend(sorted(glob.glob(path)))
        elif os.path.isdir(path):
            found.extend(_shards_in_folder(path))
        elif path.endswith(".json") and os.path.isfile(path):
            found.extend(_shards_in_index(path))
        elif os.path.exists(path):
            found.append(path)
        else:
            missing.append(path)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"shard not found: {missing[0]}{more}")
    if not found:
        raise DataError(f"no shards match {part}")
    return found


def _shards_in_folder(folder: str) -> list[str]:
    indexes = sorted(glob.glob(os.path.join(glob.escape(folder), "*-index.json")))
    if len(indexes) > 1:
        names = ", ".join(os.path.basename(index) for index in indexes)
        raise DataError(f"{folder} holds several shard sets ({names}); name one, e.g. {indexes[0]}")
    if indexes:
        return _shards_in_index(indexes[0])
    tars = sorted(glob.glob(os.path.join(glob.escape(folder), "*.tar")))
    if not tars:
        raise DataError(f"no shards match {folder} (no *-index.json or *.tar in it)")
    return tars


def read_index(path: str) -> dict:
    try:
        with open(path) as handle:
            index = json.load(handle)
        names = [shard["name"] for shard in index["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"unreadable shard index {path}: {error}") from None
    if not names:
        raise DataError(f"shard index lists no shards: {path}")
    return index


def _shards_in_index(path: str) -> list[str]:
    folder = os.path.dirname(path)
    shards = [os.path.join(folder, shard["name"]) for shard in read_index(path)["shards"]]
    missing = [shard for shard in shards if not os.path.exists(shard)]
    if missing:
        raise DataError(f"shard not found: {missing[0]} (listed in {path})")
    return shards


def count_samples(urls: Sequence[str]) -> int | None:
    """Total samples in these shards per the `*-index.json` files beside them; None if unknown."""
    counts: dict[str, int] = {}  # shard path -> count, from every index in the shards' folders
    for folder in sorted({os.path.dirname(url) for url in urls if not URL_SCHEME.match(url)}):
        for index_path in glob.glob(os.path.join(glob.escape(folder), "*-index.json")):
            for shard in read_index(index_path)["shards"]:
                counts[os.path.join(folder, shard["name"])] = int(shard["count"])
    if not all(url in counts for url in urls):
        return None
    return sum(counts[url] for url in urls)


def shards_covering(urls: Sequence[str], samples: int) -> list[str]:
    """The shortest prefix of `urls` holding at least `samples` samples (per the shard
    indexes), or all of them when the counts are unknown."""
    if samples <= 0 or count_samples(urls) is None:
        return list(urls)
    low, high = 1, len(urls)  # binary search over prefix lengths; counts are monotone
    while low < high:
        middle = (low + high) // 2
        if count_samples(urls[:middle]) >= samples:
            high = middle
        else:
            low = middle + 1
    return list(urls[:low])


def shard_urls(shards: str | os.PathLike | Sequence[str], allow_pipe: bool) -> list[str]:
    """A spec string or Path is expanded and checked by expand_shards; a list (what
    expand_shards returned) is used as it is, so a shard that disappears mid-run is skipped
    when read instead of failing the next epoch's loader."""
    if isinstance(shards, (str, os.PathLike)):
        return expand_shards(shards, allow_pipe=allow_pipe)
    urls = [os.fspath(url) for url in shards]
    if not urls:
        raise DataError("no shards given (the shard list is empty)")
    for url in urls:
        if url.startswith("pipe:") and not allow_pipe:
            refuse_pipe(url)
    return urls
