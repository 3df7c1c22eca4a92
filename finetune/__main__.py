"""`finetune` / `python -m finetune`: measure and reuse what pretraining bought.

    finetune linear   --encoder RUN_OR_EXPORT [--train SHARDS --val SHARDS]   linear probe
    finetune knn      --encoder RUN_OR_EXPORT [...]                           weighted kNN
    finetune full     --encoder RUN_OR_EXPORT [...] [--resume]                full finetune
    finetune zeroshot --encoder CLIP_RUN_DIR [--val SHARDS] [--classes a,b]   CLIP zero-shot
    finetune mlm      --encoder MLM_RUN_DIR [--val SHARDS]                    masked-token top-1

--encoder also takes any timm encoder (finetune.sources): NAME --weights FILE, a pretrained
NAME.TAG or hf-hub:ORG/NAME already in the local Hugging Face cache, or a Hub-layout folder.

Every mode takes --config FILE (configs/finetune/*.yaml), section.key=value overrides,
--random-init (the same path on a fresh encoder of the same architecture) and
--compare-random-init (both). Shards default to the pretraining run's own data. Results go to
--output (default RUN_DIR/eval/): MODE.json, MODE_confusion.png, W&B (grouped under the
pretraining run); the main process prints the result as one JSON line. Several processes:
`accelerate launch [--multi_gpu] --num_processes N -m finetune MODE ...` or torchrun.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from finetune.config import MODES, FinetuneConfig, load_finetune_config
from finetune.data import class_names_for, require_labels, resolve_shards
from finetune.encoder import EncoderNotFound, locate_encoder
from finetune.job import Job
from finetune.sources import find_encoder
from pretrain.checkpoint import TEXT_CARD
from pretrain.distributed import make_accelerator
from pretrain.errors import UserError
from pretrain.faults import NonFiniteLossError

HELP = {
    "linear": "linear probe (BatchNorm + Linear, several lrs at once) on cached features",
    "knn": "weighted kNN (cosine, k=20, T=0.07) on cached features",
    "full": "finetune encoder + new head (layer decay, drop path, mixup/cutmix)",
    "zeroshot": "CLIP zero-shot classification and image-text retrieval",
    "mlm": "masked-token accuracy of a masked-language (mlm) run on held-out captions",
}
BASELINE_KEYS = (
    "top1",
    "top5",
    "image_to_text_r1",
    "text_to_image_r1",
    "perplexity",
    "linear_probe_top1",
    "warnings",  # full: the random-init run's chance-level warning
)
RUN_DIR_MODES = ("zeroshot", "mlm")  # they load the whole model from the run's last checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    for mode in MODES:
        command = modes.add_parser(mode, help=HELP[mode])
        command.add_argument(
            "--encoder",
            required=True,
            help="run directory or export folder; or a timm encoder: NAME --weights FILE, a "
            "pretrained NAME.TAG or hf-hub:ORG/NAME in the local Hugging Face cache, or a "
            "Hub-layout folder (config.json + model.safetensors)",
        )
        command.add_argument(
            "--weights", help="a state dict for a timm --encoder NAME (.safetensors, .bin, .pth)"
        )
        command.add_argument(
            "--timm-kwargs", help="timm.create_model arguments for NAME, e.g. '{img_size: 32}'"
        )
        command.add_argument("--config", help="YAML file listing what differs from defaults")
        command.add_argument("--train", help="train shards (default: the run's data)")
        command.add_argument("--val", help="val shards (default: the run's data)")
        command.add_argument("--output", help="folder for results (default: RUN_DIR/eval)")
        command.add_argument("--pool", choices=["avg", "cls"], help="feature pooling")
        command.add_argument("--workers", type=int, help="loader processes per process")
        command.add_argument(
            "--classes", help="comma-separated class names (default: the shard index's)"
        )
        command.add_argument(
            "--random-init", action="store_true", help="a fresh encoder instead of the export"
        )
        command.add_argument(
            "--compare-random-init",
            action="store_true",
            help="also run the same path on a freshly initialised encoder",
        )
        command.add_argument("--no-wandb", action="store_true", help="skip W&B")
        if mode not in RUN_DIR_MODES:
            command.add_argument(
                "--train-samples", type=int, help="use a fixed subset of N train samples"
            )
        if mode in ("linear", "full"):
            command.add_argument("--epochs", type=int)
            command.add_argument("--batch-size", type=int, help="training batch (per process)")
        if mode == "full":
            command.add_argument(
                "--resume", action="store_true", help="continue from the last checkpoint"
            )
        command.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_finetune_config(args.config, _flags(args), args.overrides)
        result = run(args, config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    if result is not None:  # the main process reports
        print(json.dumps(result), flush=True)
    return 0


def _flags(args) -> dict:
    mode = args.mode
    return {
        "data.train_shards": args.train,
        "data.val_shards": args.val,
        "data.pool": args.pool,
        "data.num_workers": args.workers,
        "data.classes": args.classes.split(",") if args.classes else None,
        "data.train_samples": getattr(args, "train_samples", None),
        f"{mode}.epochs": getattr(args, "epochs", None),
        f"{mode}.batch_size": getattr(args, "batch_size", None),
        "logging.wandb": False if args.no_wandb else None,
    }


def _runner(mode: str):
    """The mode's runner, imported only when used: Job, random_init -> result (main process)."""
    if mode == "linear":
        from finetune.linear import run_linear as runner
    elif mode == "knn":
        from finetune.knn import run_knn as runner
    elif mode == "full":
        from finetune.full import run_full as runner
    elif mode == "zeroshot":
        from finetune.zeroshot import run_zeroshot as runner
    else:
        from finetune.mlm import run_mlm as runner
    return runner


def run(args, config: FinetuneConfig) -> dict | None:
    started = time.perf_counter()
    if args.mode == "mlm":  # the text encoder's card
        source = locate_encoder(args.encoder, TEXT_CARD, required=("open_clip_kwargs",))
    else:
        source = find_encoder(args.encoder, args.weights, args.timm_kwargs)
    if config.data.mean:  # the weights' own normalization, when the encoder's card lacks it
        source.card["mean"], source.card["std"] = list(config.data.mean), list(config.data.std)
    if args.mode in RUN_DIR_MODES and source.run_dir is None:
        raise EncoderNotFound(f"{args.mode} needs the run directory, not only {args.encoder}")
    precision = config.full.mixed_precision if args.mode == "full" else "auto"
    accelerator = make_accelerator(precision, None)
    train_urls, val_urls = resolve_shards(
        config.data, source, accelerator, need_train=args.mode not in RUN_DIR_MODES
    )
    if args.mode not in RUN_DIR_MODES:
        require_labels(train_urls, "train", args.mode)
        require_labels(val_urls, "val", args.mode)
    if source.run_dir or source.card_path:
        default_output = (source.run_dir or source.card_path.parent) / "eval"
    else:  # a timm encoder: beside the runs
        default_output = Path("runs") / source.name / "eval"
    job = Job(
        mode=args.mode,
        config=config,
        source=source,
        accelerator=accelerator,
        train_urls=train_urls,
        val_urls=val_urls,
        class_names=class_names_for(config.data, val_urls, train_urls),
        output_dir=Path(args.output) if args.output else default_output,
        resume=getattr(args, "resume", False),
    )
    runner = _runner(args.mode)
    result = runner(job, random_init=args.random_init)
    if args.compare_random_init and not args.random_init:
        baseline = runner(job, random_init=True)
        if result is not None:
            for key in BASELINE_KEYS:
                if key in baseline:
                    result[f"random_init_{key}"] = baseline[key]
    if result is not None:
        result["wall_s"] = round(time.perf_counter() - started, 1)
        # Written again: now with the baseline beside it and the whole command's time.
        name = job.result_name(args.random_init)
        (job.output_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
