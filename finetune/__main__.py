"""`finetune` / `python -m finetune`: measure what pretraining bought.

    finetune linear --encoder RUN_DIR_OR_EXPORT [--train SPEC --val SPEC] [--compare-random-init]

Train/val shards default to the pretraining run's own data (data.train_shards/val_shards in its
config.yaml). Prints one JSON line and writes it to <run_dir>/eval/linear.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from finetune.encoder import EncoderNotFound, load_encoder
from finetune.features import extract_features, set_pooling
from finetune.linear import train_linear_probe
from pretrain.data import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    linear = modes.add_parser("linear", help="linear probe on cached frozen features")
    linear.add_argument("--encoder", required=True, help="run directory or export folder")
    linear.add_argument("--train", help="train shards (default: the run's data.train_shards)")
    linear.add_argument("--val", help="val shards (default: the run's data.val_shards)")
    linear.add_argument("--pool", default="avg", choices=["avg", "token"])
    linear.add_argument("--epochs", type=int, default=100)
    linear.add_argument(
        "--train-samples", type=int, default=0, help="probe on the first N train samples (0: all)"
    )
    linear.add_argument("--batch-size", type=int, default=256)
    linear.add_argument("--workers", type=int, default=2)
    linear.add_argument("--random-init", action="store_true", help="probe a fresh encoder instead")
    linear.add_argument(
        "--compare-random-init",
        action="store_true",
        help="also probe a freshly initialised encoder of the same architecture",
    )
    linear.add_argument("--output", help="folder for linear.json (default: <run_dir>/eval)")
    args = parser.parse_args(argv)
    try:
        result = run_linear(args)
    except (EncoderNotFound, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


def run_linear(args) -> dict:
    started = time.perf_counter()
    encoder, card = load_encoder(args.encoder, random_init=args.random_init)
    run_dir = Path(card.get("run_dir", args.encoder))
    train_spec, val_spec = args.train, args.val
    if not (train_spec and val_spec):
        data = _run_data(run_dir)
        train_spec, val_spec = (
            train_spec or data.get("train_shards"),
            val_spec or data.get("val_shards"),
        )
    if not (train_spec and val_spec):
        raise DataError("give --train and --val shards (the run's config names none)")

    def probe(model, label: str) -> dict:
        set_pooling(model, args.pool)
        common = dict(image_size=card["image_size"], batch_size=256, num_workers=args.workers)
        train_x, train_y = extract_features(
            model,
            train_spec,
            description=f"{label} train",
            max_samples=args.train_samples,
            **common,
        )
        val_x, val_y = extract_features(model, val_spec, description=f"{label} val", **common)
        print(
            f"{label}: {len(train_x)} train / {len(val_x)} val features, width {train_x.shape[1]}",
            file=sys.stderr,
        )
        return train_linear_probe(
            train_x, train_y, val_x, val_y, epochs=args.epochs, batch_size=args.batch_size
        )

    main_result = probe(encoder, "random-init" if args.random_init else "pretrained")
    result = {
        "objective": card.get("objective"),
        "steps": 0 if args.random_init else card.get("steps"),
        "probe_top1": main_result["top1"],
        "probe_top5": main_result["top5"],
        "probe_best_lr": main_result["best_lr"],
        "train_samples": main_result["train_samples"],
        "val_samples": main_result["val_samples"],
    }
    if args.compare_random_init and not args.random_init:
        baseline, _ = load_encoder(args.encoder, random_init=True)
        result["random_init_probe_top1"] = probe(baseline, "random-init")["top1"]
    result.update(pool=args.pool, epochs=args.epochs, run_dir=str(run_dir))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    output = Path(args.output) if args.output else run_dir / "eval"
    output.mkdir(parents=True, exist_ok=True)
    name = "linear_random_init.json" if args.random_init else "linear.json"
    (output / name).write_text(json.dumps(result, indent=1))
    return result


def _run_data(run_dir: Path) -> dict:
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return {}
    return (yaml.safe_load(config_path.read_text()) or {}).get("data", {})


if __name__ == "__main__":
    sys.exit(main())
