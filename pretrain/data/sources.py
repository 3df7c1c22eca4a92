"""Shard sets from the user's files: an ImageFolder tree (class folders), a caption list.

Source images keep their bytes when they are JPEG or PNG; anything else Pillow reads is
re-encoded as lossless PNG. Files that are not readable images are skipped and counted.
"""

import csv
import io
import json
import logging
import os
import random
import re
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
    reads (webp, bmp, gif, tiff, ...) are decoded and re-encoded as lossless RGB PNG, so the
    shards only ever hold two formats. The format comes from the file content, not its name.
    """
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        file_format = image.format
        image.verify()  # cheap integrity check: headers and (for PNG) chunk checksums
    if file_format == "JPEG":
        return "jpg", data
    if file_format == "PNG":
        return "png", data
    with Image.open(io.BytesIO(data)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return "png", buffer.getvalue()


def _image_suffixes() -> set[str]:
    return {suffix.lower() for suffix in Image.registered_extensions()}


def _unique_key(relative: Path, taken: set[str]) -> str:
    """`cat/img.01.jpg` -> `cat/img_01`; a clash (`a.jpg` next to `a.png`) gets a number."""
    key = str(relative.with_suffix("")).replace(os.sep, "/").replace(".", "_")
    candidate, number = key, 1
    while candidate in taken:
        number += 1
        candidate = f"{key}_{number}"
    taken.add(candidate)
    return candidate


def _warn_skipped(count: int, example: str, source: str) -> None:
    if count:
        what = "file that is not a readable image" if count == 1 else "files that are not images"
        logger.warning(f"skipped {count} {what} in {source} (first: {example})")


def _class_files(root: Path, class_names: list[str]) -> tuple[list[tuple[Path, int]], list[Path]]:
    """([(image file, class index)], [files skipped by suffix]) under root/<class>/, walked in
    sorted order, hidden files and folders left out."""
    image_suffixes = _image_suffixes()
    candidates, skipped_by_suffix = [], []
    for label, class_name in enumerate(class_names):
        for folder, subfolders, files in os.walk(root / class_name):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                path = Path(folder) / name
                if path.suffix.lower() in image_suffixes:
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
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<images>)")

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
            except (OSError, ValueError, Image.DecompressionBombError):
                unreadable.append(path)
                continue
            sample = {
                "__key__": _unique_key(path.relative_to(root), taken_keys),
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
    _warn_skipped(len(skipped), str(skipped[0]) if skipped else "", str(root))
    return {**index, "skipped": len(skipped)}


# ----------------------------------------------------------------------------------------------
# Caption lists: CSV with a header, or a JSON list of objects.

IMAGE_COLUMNS = ("image", "path")
CAPTION_COLUMNS = ("caption", "text")


def _read_caption_rows(list_file: Path) -> list[dict]:
    if list_file.suffix.lower() == ".json":
        try:
            rows = json.loads(list_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise DataError(f"{list_file} is not valid JSON: {error}") from None
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise DataError(f"{list_file} must hold a JSON list of objects")
        return rows
    with open(list_file, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _pick_column(row: dict, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in row), None)


def write_captions(
    list_file: str | Path,
    out_dir: str | Path,
    prefix: str = "train",
    max_count: int = 10000,
    max_size: int = 1 << 30,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Shard image/caption pairs listed in a CSV (header row) or JSON file (list of objects).

    Columns: `image` or `path`; `caption` or `text`; optional `label` (integers are used as
    they are, any other values become class names, sorted). Relative image paths resolve
    against the list file's folder. Keys are the row numbers (`00000042`). Missing or
    unreadable images are skipped and counted. Returns the index dict plus `"skipped"`.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"caption list not found: {list_file}")
    rows = _read_caption_rows(list_file)
    if not rows:
        raise DataError(f"caption list is empty: {list_file}")
    image_column = _pick_column(rows[0], IMAGE_COLUMNS)
    caption_column = _pick_column(rows[0], CAPTION_COLUMNS)
    if image_column is None or caption_column is None:
        raise DataError(
            f"{list_file} needs an 'image' (or 'path') and a 'caption' (or 'text') column; "
            f"found: {', '.join(rows[0]) or 'none'}"
        )
    labels, class_names = _caption_labels(rows, list_file)

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    key_width = max(8, len(str(len(rows))))
    skipped: list[str] = []

    def samples() -> Iterator[dict]:
        for row_number in order:
            row = rows[row_number]
            path = list_file.parent / str(row.get(image_column) or "")
            try:
                field, data = read_image_file(path)
            except (OSError, ValueError, Image.DecompressionBombError):
                skipped.append(str(path))
                continue
            sample = {
                "__key__": f"{row_number:0{key_width}d}",
                field: data,
                "txt": str(row.get(caption_column) or ""),
            }
            if labels is not None:
                sample["cls"] = labels[row_number]
            yield sample

    index = write_shards(
        samples(),
        out_dir,
        prefix,
        max_count,
        max_size,
        class_names,
        total=len(rows),
        overwrite=overwrite,
        progress=progress,
    )
    _warn_skipped(len(skipped), skipped[0] if skipped else "", str(list_file))
    return {**index, "skipped": len(skipped)}


def _caption_labels(rows: list[dict], list_file: Path) -> tuple[list[int] | None, list | None]:
    """Integer labels pass through (no class names); other labels map to sorted class names."""
    if "label" not in rows[0]:
        return None, None
    values = [row.get("label") for row in rows]
    if any(value is None or str(value).strip() == "" for value in values):
        raise DataError(f"{list_file}: every row needs a label once the 'label' column exists")
    texts = [str(value).strip() for value in values]
    if all(re.fullmatch(r"-?\d+", text) for text in texts):
        return [int(text) for text in texts], None
    class_names = sorted(set(texts))
    label_of = {name: number for number, name in enumerate(class_names)}
    return [label_of[text] for text in texts], class_names
