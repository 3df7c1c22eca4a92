"""Shards from a caption list: a CSV with a header row, or a JSON list of objects, one row per
(image, caption) pair.

Real caption sets give an image several captions (five in the usual retrieval benchmarks), one
row each. The rows are grouped by image: each image is stored once, with all its captions, so
that training draws one of them per step and retrieval is scored over unique images (finetune
zeroshot). A sample holds `KEY.txt` (the image's first caption, which is all that shards of
single-caption lists hold, byte for byte as before) and, when the image has several captions,
`KEY.json` = {"captions": [every caption, in row order]}.
"""

import csv
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

from pretrain.data.sources import UNREADABLE, read_image_file, warn_skipped
from pretrain.data.write import write_shards
from pretrain.errors import DataError

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


def _group_rows(rows: list[dict], image_column: str, list_file: Path) -> list[list[int]]:
    """Row numbers grouped by the image file they name (the same file however it is spelt:
    relative or absolute), groups in the order of their first row, rows in file order."""
    groups: dict[Path, list[int]] = {}
    for row_number, row in enumerate(rows):
        path = (list_file.parent / str(row.get(image_column) or "")).resolve()
        groups.setdefault(path, []).append(row_number)
    return list(groups.values())


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
    """Shard the images of a caption list, each once with all its captions.

    Columns: `image` or `path`; `caption` or `text`; optional `label` (integers are used as
    they are, any other values become class names, sorted; rows of one image must agree).
    Relative image paths resolve against the list file's folder. An image's key is the number
    of its first row (`00000042`). Images are written in an order shuffled with `seed`; missing
    or unreadable images are skipped and counted. Returns the index dict plus `"skipped"`
    (images) and `"num_captions"`.
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
    groups = _group_rows(rows, image_column, list_file)
    if labels is not None:
        _check_one_label_per_image(groups, labels, rows, image_column, list_file)

    random.Random(seed).shuffle(groups)
    key_width = max(8, len(str(len(rows))))
    skipped: list[str] = []
    written_captions = 0

    def samples() -> Iterator[dict]:
        nonlocal written_captions
        for row_numbers in groups:
            first = row_numbers[0]
            path = list_file.parent / str(rows[first].get(image_column) or "")
            try:
                field, data = read_image_file(path)
            except UNREADABLE:
                skipped.append(str(path))
                continue
            captions = [str(rows[number].get(caption_column) or "") for number in row_numbers]
            sample = {"__key__": f"{first:0{key_width}d}", field: data, "txt": captions[0]}
            if len(captions) > 1:
                sample["json"] = {"captions": captions}
            if labels is not None:
                sample["cls"] = labels[first]
            written_captions += len(captions)
            yield sample

    index = write_shards(
        samples(),
        out_dir,
        prefix,
        max_count,
        max_size,
        class_names,
        total=len(groups),
        overwrite=overwrite,
        progress=progress,
    )
    warn_skipped(len(skipped), skipped[0] if skipped else "", str(list_file))
    return {**index, "skipped": len(skipped), "num_captions": written_captions}


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


def _check_one_label_per_image(groups, labels, rows, image_column, list_file) -> None:
    for row_numbers in groups:
        if len({labels[number] for number in row_numbers}) > 1:
            image = rows[row_numbers[0]].get(image_column)
            numbers = ", ".join(str(number + 1) for number in row_numbers[:4])
            raise DataError(
                f"{list_file}: the rows of image {image} give it different labels (rows {numbers})"
            )
