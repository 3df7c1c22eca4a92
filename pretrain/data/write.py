"""Write images (and labels, captions) into WebDataset tar shards plus a JSON index.

A shard set is `OUT/{prefix}-000000.tar, ...` and `OUT/{prefix}-index.json`:

    {"shards": [{"name": "train-000000.tar", "count": 10000}, ...],
     "num_samples": 25000, "class_names": ["cat", "dog"] or null,
     "pattern": "train-{000000..000002}.tar"}

Each sample in a shard holds `KEY.jpg` or `KEY.png` (the source file's bytes, not re-encoded),
`KEY.cls` (class index as ASCII digits) when labelled and `KEY.txt` (UTF-8) when captioned.
The index is written last, through a temporary file and os.replace, so a directory with an index
holds a complete shard set; a failed run removes its partial shards.

Command line:
    python -m pretrain.data.write imagefolder SRC OUT [--prefix train] [--max-count N] ...
    python -m pretrain.data.write captions LIST OUT [--prefix train] ...
    python -m pretrain.data.write demo OUT [--train N] [--val N] [--size 32] [--seed 0]
"""

import argparse
import csv
import io
import json
import logging
import os
import random
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pretrain.data.errors import DataError

logger = logging.getLogger(__name__)

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
    optionally `cls` (int) and `txt` (str). A shard is closed once it holds `max_count` samples
    or `max_size` bytes. `total` only sizes the progress bar. Returns the index dict.
    """
    if max_count < 1 or max_size < 1:
        raise DataError(f"max_count and max_size must be positive, got {max_count}, {max_size}")
    out_dir = Path(out_dir)
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
    try:
        bar = tqdm(
            samples,
            total=total,
            desc=f"writing {prefix}",
            unit="img",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
        )
        for sample in bar:
            writer.write(_encode_sample(sample))
        writer.close()
        if sum(shard["count"] for shard in written) == 0:
            raise DataError(f"no samples to write into {out_dir} (every input was skipped)")
    except BaseException:
        # Leave nothing half-written behind: no index, no partial shards.
        if getattr(writer, "tarstream", None) is not None:
            writer.tarstream.close()
        _remove_shards(out_dir, prefix)
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

    image_suffixes = _image_suffixes()
    candidates: list[tuple[Path, int]] = []  # (file, class index)
    skipped_by_suffix: list[Path] = []
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


# ----------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """Usage mistakes become DataError, so every failure prints one `error:` line."""

    def error(self, message: str):
        raise DataError(message)


def _add_shard_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    command.add_argument("--max-count", type=int, default=10000, help="samples per shard")
    command.add_argument(
        "--max-size-mb", type=float, default=1024, help="shard size limit in MiB (default: 1024)"
    )
    command.add_argument("--seed", type=int, default=0, help="seed of the write order")
    command.add_argument(
        "--overwrite", action="store_true", help="replace existing shards with the same prefix"
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m pretrain.data.write", description="Write WebDataset shards for pretraining."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    imagefolder = commands.add_parser("imagefolder", help="SRC/<class>/<images> -> shards")
    imagefolder.add_argument("src")
    imagefolder.add_argument("out")
    _add_shard_options(imagefolder)
    imagefolder.add_argument(
        "--caption-template",
        default=None,
        help='also write a caption per image from its class name, e.g. "a photo of a {}."',
    )

    captions = commands.add_parser("captions", help="CSV/JSON image-caption list -> shards")
    captions.add_argument("list_file")
    captions.add_argument("out")
    _add_shard_options(captions)

    demo = commands.add_parser("demo", help="draw the embedded demo set (train and val)")
    demo.add_argument("out")
    demo.add_argument("--train", type=int, default=10000, help="training images")
    demo.add_argument("--val", type=int, default=2000, help="validation images")
    demo.add_argument("--size", type=int, default=32, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "demo":
            from pretrain.data.demo import write_demo

            result = write_demo(
                args.out,
                num_train=args.train,
                num_val=args.val,
                image_size=args.size,
                seed=args.seed,
                overwrite=args.overwrite,
            )
            summary = {split: index["num_samples"] for split, index in result.items()}
            print(f"wrote demo data to {args.out}: {summary}")
            return 0
        options = dict(
            prefix=args.prefix,
            max_count=args.max_count,
            max_size=int(args.max_size_mb * (1 << 20)),
            seed=args.seed,
            overwrite=args.overwrite,
        )
        if args.command == "imagefolder":
            index = write_imagefolder(
                args.src, args.out, caption_template=args.caption_template, **options
            )
        else:
            index = write_captions(args.list_file, args.out, **options)
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {index['num_samples']} samples in {len(index['shards'])} shards: "
        f"{os.path.join(args.out, index['pattern'])} (skipped {index['skipped']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
