"""Shard sets from an ImageFolder tree (class folders), and what every writer of the user's files
shares: reading an image file, sample keys, the skipped-files warning.

Source images keep their bytes when they are JPEG or PNG; anything else Pillow reads is
re-encoded as lossless PNG. Files that are not readable images are skipped and counted.
Unlabelled folders and path lists are in unlabelled.py, caption lists in captions.py.
"""

import io
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from pretrain.data.write import write_shards
from pretrain.errors import DataError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Reading source images: keep JPEG and PNG bytes as they are, re-encode anything else as PNG.


def read_image_file(path: Path) -> tuple[str, bytes]:
    """Returns (field, bytes) with field "jpg" or "png"; raises OSError/ValueError if unreadable.

    JPEG and PNG files keep their original bytes (no generation loss); other formats Pillow
    reads (webp, bmp, gif, tiff, ...) are re-encoded as lossless RGB PNG, so the shards only
    ever hold two formats. The format comes from the file content, not its name. Every image is
    decoded once here: a truncated JPEG passes Pillow's verify() and would otherwise only fail
    when a training step reads it.
    """
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        file_format = image.format
        image.verify()  # cheap integrity check: headers and (for PNG) chunk checksums
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes every pixel: a truncated file fails here
        if file_format in ("JPEG", "PNG"):
            return ("jpg" if file_format == "JPEG" else "png"), data
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return "png", buffer.getvalue()


UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)  # what read_image_file raises


def image_suffixes() -> set[str]:
    return {suffix.lower() for suffix in Image.registered_extensions()}


def unique_key(relative: Path, taken: set[str]) -> str:
    """`cat/img.01.jpg` -> `cat/img_01`; a clash (`a.jpg` next to `a.png`) gets a number."""
    key = str(relative.with_suffix("")).replace(os.sep, "/").replace(".", "_")
    candidate, number = key, 1
    while candidate in taken:
        number += 1
        candidate = f"{key}_{number}"
    taken.add(candidate)
    return candidate


def warn_skipped(count: int, example: str, source: str) -> None:
    if count:
        what = "file that is not a readable image" if count == 1 else "files that are not images"
        logger.warning(f"skipped {count} {what} in {source} (first: {example})")


def _class_files(root: Path, class_names: list[str]) -> tuple[list[tuple[Path, int]], list[Path]]:
    """([(image file, class index)], [files skipped by suffix]) under root/<class>/, walked in
    sorted order, hidden files and folders left out."""
    suffixes = image_suffixes()
    candidates, skipped_by_suffix = [], []
    for label, class_name in enumerate(class_names):
        for folder, subfolders, files in os.walk(root / class_name):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                path = Path(folder) / name
                if path.suffix.lower() in suffixes:
                    candidates.append((path, label))
                else:
                    skipped_by_suffix.append(path)
    return candidates, skipped_by_suffix


def write_imagefolder(
    root: str | Path,
    out_dir: str | Path,
    prefix: str = "train",
    max_count: int = 10000,
    max_size: int = 1 << 30,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    caption_template: str | None = None,
) -> dict:
    """Shard an ImageFolder tree `root/<class>/**/<image>`; classes are the sorted folder names.

    `caption_template` ("a photo of a {}.") also writes a `txt` caption per image from its class
    name (underscores read as spaces), which turns a labelled folder into CLIP training data.

    Files are written in an order shuffled with `seed`, so each shard mixes classes. Keys are
    the relative paths without extension, dots replaced by `_` (`cat/img_01`). Files that are not
    readable images (by suffix or by Pillow's verify) are skipped and counted; one warning line
    reports the count. Returns the index dict plus `"skipped"`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    if caption_template is not None and "{}" not in caption_template:
        raise DataError(
            f"caption template must contain {{}} for the class name: {caption_template!r}"
        )
    class_names = sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    if not class_names:
        raise DataError(
            f"no class folders in {root} (expected {root}/<class>/<images>); for images without "
            f"labels use: pretrain shards images {root} OUT"
        )

    candidates, skipped_by_suffix = _class_files(root, class_names)
    if not candidates:
        raise DataError(f"no images found in the class folders of {root}")
    random.Random(seed).shuffle(candidates)

    unreadable: list[Path] = []

    def samples() -> Iterator[dict]:
        taken_keys: set[str] = set()
        for path, label in candidates:
            try:
                field, data = read_image_file(path)
            except UNREADABLE:
                unreadable.append(path)
                continue
            sample = {
                "__key__": unique_key(path.relative_to(root), taken_keys),
                field: data,
                "cls": label,
            }
            if caption_template is not None:
                sample["txt"] = caption_template.format(class_names[label].replace("_", " "))
            yield sample

    index = write_shards(
        samples(),
        out_dir,
        prefix,
        max_count,
        max_size,
        class_names,
        total=len(candidates),
        overwrite=overwrite,
        progress=progress,
    )
    skipped = skipped_by_suffix + unreadable
    warn_skipped(len(skipped), str(skipped[0]) if skipped else "", str(root))
    return {**index, "skipped": len(skipped)}
