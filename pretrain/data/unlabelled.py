"""Shards from images without labels: a folder tree with no class structure, or a list file of
image paths (for data that does not sit in one tree). The samples hold an image and no `cls`.

A folder is walked recursively in sorted order, symbolic links followed once each (a linked
folder that leads back into the walk, or a file reached twice, is taken once), hidden files and
folders left out. Files whose suffix is not an image format Pillow knows, and files that do not
decode, are skipped and counted. Keys are the paths relative to the folder (or, for a list, to
the folder all listed files share) without extension, dots replaced by `_`.
"""

import os
import random
from collections.abc import Iterator
from pathlib import Path

from pretrain.data.sources import (
    UNREADABLE,
    image_suffixes,
    read_image_file,
    unique_key,
    warn_skipped,
)
from pretrain.data.write import write_shards
from pretrain.errors import DataError


def _walk_images(root: Path) -> tuple[list[Path], list[Path]]:
    """(image files by suffix, other files) under root, sorted, each real file once."""
    suffixes = image_suffixes()
    images, others = [], []
    seen_folders, seen_files = set(), set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_folders:  # a link back into the walk: its files are already taken
            subfolders[:] = []
            continue
        seen_folders.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or not path.is_file():  # hidden, or a dangling link
                continue
            if os.path.realpath(path) in seen_files:
                continue
            seen_files.add(os.path.realpath(path))
            (images if path.suffix.lower() in suffixes else others).append(path)
    return images, others


def _read_path_list(list_file: Path) -> list[Path]:
    """Paths of a list file: one per line, relative ones against the list's folder; blank lines
    and `#` comments left out. A path that does not exist stops everything (a typo, not data
    rot), before anything is written."""
    paths = []
    for line_number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        path = list_file.parent / os.path.expanduser(text)
        if not path.is_file():
            raise DataError(f"{list_file} line {line_number}: no such file: {text}")
        paths.append(path)
    return paths


def write_images(
    root: str | Path,
    out_dir: str | Path,
    prefix: str = "train",
    max_count: int = 10000,
    max_size: int = 1 << 30,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    max_images: int | None = None,
) -> dict:
    """Shard every image under the folder `root` (no labels). Returns the index plus "skipped".

    Files are written in an order shuffled with `seed` (consecutive files of one sub-folder
    often look alike; shuffled, each shard mixes them). `max_images` keeps the first N of that
    order that decode. Files that are not readable images are skipped and counted in one
    warning line.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    images, others = _walk_images(root)
    if not images:
        found = f" (found {len(others)} files that are not images)" if others else ""
        raise DataError(f"no images in {root}{found}")
    relative = [path.relative_to(root) for path in images]
    options = dict(prefix=prefix, max_count=max_count, max_size=max_size, overwrite=overwrite)
    return _write(images, relative, out_dir, str(root), others, seed, max_images, progress, options)


def write_image_list(
    list_file: str | Path,
    out_dir: str | Path,
    prefix: str = "train",
    max_count: int = 10000,
    max_size: int = 1 << 30,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    max_images: int | None = None,
) -> dict:
    """Shard the images a list file names, one path per line (no labels), as write_images."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"image list not found: {list_file}")
    listed = _read_path_list(list_file)
    if not listed:
        raise DataError(f"image list names no files: {list_file}")
    suffixes = image_suffixes()
    unique = list(dict.fromkeys(Path(os.path.realpath(path)) for path in listed))
    images = [path for path in unique if path.suffix.lower() in suffixes]
    others = [path for path in unique if path.suffix.lower() not in suffixes]
    if not images:
        raise DataError(f"{list_file} names no images ({len(others)} files that are not images)")
    common = Path(os.path.commonpath([path.parent for path in images]))
    relative = [path.relative_to(common) for path in images]
    options = dict(prefix=prefix, max_count=max_count, max_size=max_size, overwrite=overwrite)
    source = str(list_file)
    return _write(images, relative, out_dir, source, others, seed, max_images, progress, options)


def _write(images, relative, out_dir, source, others, seed, max_images, progress, options):
    """Shard `images` (keys from their `relative` paths) in a seeded order; the index dict plus
    "skipped" (`others`, files that are not images, and those that fail to decode)."""
    if max_images is not None and max_images < 1:
        raise DataError(f"--max-images must be at least 1, got {max_images}")
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    wanted = len(order) if max_images is None else min(max_images, len(order))
    unreadable: list[Path] = []

    def samples() -> Iterator[dict]:
        taken_keys: set[str] = set()
        for number in order:
            if len(taken_keys) == wanted:  # --max-images readable ones written
                return
            try:
                field, data = read_image_file(images[number])
            except UNREADABLE:
                unreadable.append(images[number])
                continue
            yield {"__key__": unique_key(relative[number], taken_keys), field: data}

    try:
        index = write_shards(samples(), out_dir, total=wanted, progress=progress, **options)
    except DataError as error:
        if unreadable and str(error).startswith("no samples to write"):
            files = (
                "the one image file"
                if len(unreadable) == 1
                else f"all {len(unreadable)} image files"
            )
            raise DataError(
                f"no readable images in {source}: {files} failed to decode (first: {unreadable[0]})"
            ) from None
        raise
    skipped = others + unreadable
    warn_skipped(len(skipped), str(skipped[0]) if skipped else "", source)
    return {**index, "skipped": len(skipped)}
