"""`pretrain shards ...`: write WebDataset shards from the command line.

    pretrain shards imagefolder SRC OUT [--prefix train] [--max-count N] ...   SRC/<class>/...
    pretrain shards images SRC OUT [--max-images N] ...        any folder tree, no labels
    pretrain shards imagelist LIST OUT [--max-images N] ...    a file of image paths, no labels
    pretrain shards captions LIST OUT [--prefix train] ...     CSV/JSON, one row per caption
    pretrain shards demo OUT [--train N] [--val N] [--size 32] [--seed 0]

(`python -m pretrain.data.cli ...` is the same.) Every failure prints one `error:` line and
exits with status 2.
"""

import argparse
import os
import sys

from pretrain.data.captions import write_captions
from pretrain.data.demo import write_demo
from pretrain.data.sources import write_imagefolder
from pretrain.data.unlabelled import write_image_list, write_images
from pretrain.errors import DataError


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


def _add_max_images(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="use at most N images (the first of the seeded order)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pretrain shards", description="Write WebDataset shards for pretraining.")
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

    images = commands.add_parser("images", help="a folder of images, any layout, no labels")
    images.add_argument("src")
    images.add_argument("out")
    _add_shard_options(images)
    _add_max_images(images)

    imagelist = commands.add_parser("imagelist", help="a file of image paths, one a line")
    imagelist.add_argument("list_file")
    imagelist.add_argument("out")
    _add_shard_options(imagelist)
    _add_max_images(imagelist)

    captions = commands.add_parser(
        "captions", help="CSV/JSON image-caption list (one row per caption) -> shards"
    )
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
        elif args.command == "images":
            index = write_images(args.src, args.out, max_images=args.max_images, **options)
        elif args.command == "imagelist":
            index = write_image_list(
                args.list_file, args.out, max_images=args.max_images, **options
            )
        else:
            index = write_captions(args.list_file, args.out, **options)
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    captions = f" with {index['num_captions']} captions" if "num_captions" in index else ""
    print(
        f"wrote {index['num_samples']} samples{captions} in {len(index['shards'])} shards: "
        f"{os.path.join(args.out, index['pattern'])} (skipped {index['skipped']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
