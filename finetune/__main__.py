"""`finetune` / `python -m finetune`: measure and reuse what pretraining bought.

    finetune linear   --encoder RUN_OR_EXPORT [--train SHARDS --val SHARDS]   linear probe
    finetune knn      --encoder RUN_OR_EXPORT [...]                           weighted kNN
    finetune full     --encoder RUN_OR_EXPORT [...] [--resume]                full finetune
    finetune zeroshot --encoder CLIP_RUN_DIR [--val SHARDS] [--classes a,b]   CLIP zero-shot

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
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from finetune.config import MODES, FinetuneConfig, load_finetune_config, section_dict
from finetune.data import class_names_for, resolve_shards
from finetune.encoder import (
    EncoderNotFound,
    EncoderSource,
    locate_encoder,
    set_pooling,
    weights_fingerprint,
)
from finetune.features import (
    FeatureSet,
    SampleTransform,
    cached_features,
    extract_features,
    shard_fingerprint,
)
from finetune.report import Report
from pretrain.config import ConfigError
from pretrain.data import DataError
from pretrain.data.transforms import eval_transform
from pretrain.distributed import LaunchError, make_accelerator
from pretrain.models.encoder import ModelError

USER_ERRORS = (ConfigError, DataError, ModelError, LaunchError, EncoderNotFound)
FEATURE_CACHE_VERSION = 1  # bump when extraction changes what the same inputs produce


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    helps = {
        "linear": "linear probe (BatchNorm + Linear, several lrs at once) on cached features",
        "knn": "weighted kNN (cosine, k=20, T=0.07) on cached features",
        "full": "finetune encoder + new head (layer decay, drop path, mixup/cutmix)",
        "zeroshot": "CLIP zero-shot classification and image-text retrieval",
    }
    for mode in MODES:
        command = modes.add_parser(mode, help=helps[mode])
        command.add_argument("--encoder", required=True, help="run directory or export folder")
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
        if mode != "zeroshot":
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
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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


@dataclass
class Job:
    """What every mode needs: settings, the encoder's source, data, the process group."""

    mode: str
    config: FinetuneConfig
    source: EncoderSource
    accelerator: Accelerator
    train_urls: list[str]
    val_urls: list[str]
    class_names: list[str] | None
    output_dir: Path

    @property
    def cache_dir(self) -> Path | None:
        data = self.config.data
        if not data.cache:
            return None
        return Path(data.cache_dir) if data.cache_dir else self.output_dir / "features"

    def report(self, random_init: bool) -> Report:
        name = f"{self.mode}_random_init" if random_init else self.mode
        return Report(
            self.output_dir,
            name,
            self.mode,
            self.source,
            self.config.logging,
            {**section_dict(self.config, self.mode), "random_init": random_init},
            is_main=self.accelerator.is_main_process,
        )


def run(args, config: FinetuneConfig) -> dict | None:
    started = time.perf_counter()
    source = locate_encoder(args.encoder)
    if args.mode == "zeroshot" and source.run_dir is None:
        raise EncoderNotFound(f"zeroshot needs the CLIP run directory, not only {args.encoder}")
    precision = config.full.mixed_precision if args.mode == "full" else "auto"
    accelerator = make_accelerator(precision, None)
    train_urls, val_urls = resolve_shards(
        config.data, source, accelerator, need_train=args.mode != "zeroshot"
    )
    default_output = (source.run_dir or source.card_path.parent) / "eval"
    job = Job(
        mode=args.mode,
        config=config,
        source=source,
        accelerator=accelerator,
        train_urls=train_urls,
        val_urls=val_urls,
        class_names=class_names_for(config.data, val_urls, train_urls),
        output_dir=Path(args.output) if args.output else default_output,
    )
    runner = RUNNERS[args.mode]
    result = runner(job, random_init=args.random_init, resume=getattr(args, "resume", False))
    if args.compare_random_init and not args.random_init:
        baseline = runner(job, random_init=True, resume=getattr(args, "resume", False))
        if result is not None:
            for key in ("top1", "top5", "image_to_text_r1", "text_to_image_r1"):
                if key in baseline:
                    result[f"random_init_{key}"] = baseline[key]
    if result is not None:
        result["wall_s"] = round(time.perf_counter() - started, 1)
        # Written again: now with the baseline beside it and the whole command's time.
        name = f"{args.mode}_random_init" if args.random_init else args.mode
        (job.output_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _describe(job: Job, random_init: bool) -> dict:
    """The result fields every mode shares."""
    card = job.source.card
    return {
        "mode": job.mode,
        "objective": card.get("objective"),
        "steps": 0 if random_init else card.get("steps"),
        "random_init": random_init,
        "encoder": str(job.source.card_path),
        "run_dir": str(job.source.run_dir) if job.source.run_dir else None,
        "processes": job.accelerator.num_processes,
        **({} if job.mode == "zeroshot" else {"pool": job.config.data.pool}),
    }


# --- frozen features: linear probe and kNN ------------------------------------------------------


def frozen_features(job: Job, random_init: bool) -> tuple[FeatureSet, FeatureSet, bool]:
    """Train and val features of the frozen encoder, from the cache when it has them."""
    data, source, accelerator = job.config.data, job.source, job.accelerator
    encoder = source.create(random_init=random_init, seed=0)
    set_pooling(encoder, data.pool)
    encoder.to(accelerator.device)
    image_size = data.image_size or source.image_size
    transform = SampleTransform(
        eval_transform(image_size, source.mean, source.std, data.crop_fraction).image_transform
    )
    identity = {
        "version": FEATURE_CACHE_VERSION,
        "weights": weights_fingerprint(encoder),
        "pool": data.pool,
        "image_size": image_size,
        "crop_fraction": data.crop_fraction,
        "mean": list(source.mean),
        "std": list(source.std),
    }
    label = "random-init" if random_init else "pretrained"
    splits, all_cached = [], True
    for split, urls, limit in (
        ("train", job.train_urls, data.train_samples),
        ("val", job.val_urls, 0),
    ):
        features, cached = cached_features(
            job.cache_dir,
            {**identity, "shards": shard_fingerprint(urls), "max_samples": limit},
            accelerator,
            lambda urls=urls, limit=limit, split=split: extract_features(
                encoder,
                urls,
                transform,
                accelerator,
                batch_size=data.batch_size,
                num_workers=data.num_workers,
                max_samples=limit,
                description=f"{label} {split}",
            ),
        )
        features.require_labels(split)
        splits.append(features)
        all_cached = all_cached and cached
    if accelerator.is_main_process:
        train, val = splits
        print(
            f"{label}: {len(train)} train / {len(val)} val features of width "
            f"{train.features.shape[1]}{' (cached)' if all_cached else ''}",
            file=sys.stderr,
        )
    return splits[0], splits[1], all_cached


def _num_classes(job: Job, *label_sets: torch.Tensor) -> int:
    largest = max(int(labels.max()) for labels in label_sets) + 1
    return max(largest, len(job.class_names or []))


def run_linear(job: Job, random_init: bool, resume: bool = False) -> dict | None:
    from finetune.linear import train_linear_probe

    train, val, cached = frozen_features(job, random_init)
    if not job.accelerator.is_main_process:
        return None
    settings = job.config.linear
    report = job.report(random_init)
    classes = _num_classes(job, train.labels, val.labels)
    metrics, logits = train_linear_probe(
        train.features,
        train.labels,
        val.features,
        val.labels,
        learning_rates=tuple(settings.learning_rates),
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        weight_decay=settings.weight_decay,
        seed=settings.seed,
        num_classes=classes,
        device=job.accelerator.device,
    )
    title = f"linear probe, {job.source.name}{' random init' if random_init else ''}"
    result = {
        **_describe(job, random_init),
        **metrics,
        "epochs": settings.epochs,
        "features_cached": cached,
        "skipped_samples": train.skipped + val.skipped,
    }
    result.update(report.confusion(logits, val.labels, classes, job.class_names, title))
    report.finish(result)
    return result


def run_knn(job: Job, random_init: bool, resume: bool = False) -> dict | None:
    from finetune.knn import knn_evaluate

    train, val, cached = frozen_features(job, random_init)
    if not job.accelerator.is_main_process:
        return None
    settings = job.config.knn
    report = job.report(random_init)
    classes = _num_classes(job, train.labels, val.labels)
    metrics, scores = knn_evaluate(
        train.features,
        train.labels,
        val.features,
        val.labels,
        num_classes=classes,
        k=settings.k,
        temperature=settings.temperature,
        device=job.accelerator.device,
    )
    title = f"kNN k={settings.k}, {job.source.name}{' random init' if random_init else ''}"
    result = {
        **_describe(job, random_init),
        **metrics,
        "features_cached": cached,
        "skipped_samples": train.skipped + val.skipped,
    }
    result.update(report.confusion(scores, val.labels, classes, job.class_names, title))
    report.finish(result)
    return result


# --- full finetune ------------------------------------------------------------------------------


def run_full(job: Job, random_init: bool, resume: bool = False) -> dict | None:
    from finetune.full import finetune

    if not job.class_names:
        raise ConfigError(
            "full finetuning needs the class count: the shard index names no classes; "
            "pass --classes a,b,c"
        )
    report = job.report(random_init)
    result, confusion = finetune(
        job.source,
        job.config.full,
        job.config.data,
        job.train_urls,
        job.val_urls,
        len(job.class_names),
        job.accelerator,
        job.output_dir / report.name,
        report,
        random_init=random_init,
        resume=resume,
    )
    if not job.accelerator.is_main_process:
        return None
    title = f"full finetune, {job.source.name}{' random init' if random_init else ''}"
    result = {**_describe(job, random_init), **result}
    result.update(report.confusion_from_matrix(confusion, job.class_names, title))
    report.finish(result)
    return result


# --- zero-shot ----------------------------------------------------------------------------------


def run_zeroshot(job: Job, random_init: bool, resume: bool = False) -> dict | None:
    from finetune.metrics import topk_accuracy
    from finetune.zeroshot import (
        caption_groups,
        class_embeddings,
        encode_texts,
        load_clip,
        retrieval_recall,
        zero_shot_scores,
    )

    data, accelerator = job.config.data, job.accelerator
    clip, run_config = load_clip(job.source.run_dir, random_init)
    clip.to(accelerator.device)
    image_size = data.image_size or run_config.data.image_size
    transform = SampleTransform(
        eval_transform(
            image_size, job.source.mean, job.source.std, data.crop_fraction
        ).image_transform
    )
    identity = {
        "version": FEATURE_CACHE_VERSION,
        "weights": weights_fingerprint(clip),
        "tower": "clip.encode_image",
        "image_size": image_size,
        "crop_fraction": data.crop_fraction,
        "shards": shard_fingerprint(job.val_urls),
    }
    val, cached = cached_features(
        job.cache_dir,
        identity,
        accelerator,
        lambda: extract_features(
            clip.encode_image,
            job.val_urls,
            transform,
            accelerator,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            description="clip images",
        ),
    )
    if not accelerator.is_main_process:
        return None
    settings = job.config.zeroshot
    report = job.report(random_init)
    result = {**_describe(job, random_init), "val_samples": len(val), "features_cached": cached}
    device = accelerator.device
    with torch.no_grad(), accelerator.autocast():
        if val.labels is not None and job.class_names:
            classes = len(job.class_names)
            if int(val.labels.max()) >= classes:
                raise DataError(
                    f"the val labels go up to {int(val.labels.max())} but only {classes} "
                    "class names are known"
                )
            embeds = class_embeddings(
                clip.encode_text, clip.tokenize, job.class_names, settings.templates, device
            )
            scores = zero_shot_scores(val.features.to(device), embeds).float().cpu()  # [N, C]
            result.update(
                top1=topk_accuracy(scores, val.labels, 1),
                top5=topk_accuracy(scores, val.labels, 5),
                num_classes=classes,
                templates=list(settings.templates),
            )
            title = f"zero-shot, {job.source.name}{' random init' if random_init else ''}"
            result.update(report.confusion(scores, val.labels, classes, job.class_names, title))
        if val.captions:
            texts = encode_texts(
                clip.encode_text, clip.tokenize, val.captions, settings.text_batch_size, device
            )
            result.update(
                retrieval_recall(val.features, texts, text_groups=caption_groups(val.captions))
            )
    if "top1" not in result and "image_to_text_r1" not in result:
        raise DataError(
            "the val shards carry neither class labels with class names (--classes) nor "
            "captions (txt): nothing to evaluate zero-shot"
        )
    report.finish(result)
    return result


RUNNERS = {"linear": run_linear, "knn": run_knn, "full": run_full, "zeroshot": run_zeroshot}

if __name__ == "__main__":
    sys.exit(main())
