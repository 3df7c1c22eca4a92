"""Linear-probe cost: features cached once (what `finetune linear` does) versus running the frozen
encoder on every mini-batch of every epoch; wall time and top-1 of each, same images, same heads.

    python -m benchmarks.probe [--train-samples 1000] [--val-samples 1000] [--epochs 30]

Both variants start from the same decoded images held in memory (decoding is timed apart), so
the per-epoch variant is charged for the encoder only, never for re-reading shards: its cost here
is a lower bound. The cached variant is finetune.linear.train_linear_probe on features extracted
once; the per-epoch variant is the same training loop (same heads, learning rates, order and
schedule) with the features recomputed for each mini-batch.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks import workloads
from benchmarks.harness import ROOT, emit, environment, fail, parser
from finetune.encoder import locate_encoder, set_pooling
from finetune.linear import ParallelLinearHeads, train_linear_probe
from finetune.metrics import topk_accuracy
from pretrain.data import DataError, eval_loader, eval_transform
from pretrain.models.encoder import build_encoder

DEFAULT_TRAIN = ROOT / "data_cache" / "cifar10" / "train-index.json"
DEFAULT_VAL = ROOT / "data_cache" / "cifar10" / "test-index.json"
LEARNING_RATES = (0.01, 0.03, 0.1, 0.3, 1.0)


def decoded_images(shards: str, count: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images of the shards as (images [N, 3, H, W], labels [N])."""
    images, labels = [], []
    loader = eval_loader(shards, eval_transform(image_size), 256, 0, 1, num_workers=0)
    for batch in loader:
        images.append(batch["image"])
        labels.append(batch["label"])
        if sum(len(part) for part in labels) >= count:
            break
    return torch.cat(images)[:count], torch.cat(labels)[:count]


@torch.no_grad()
def encode(encoder: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat(
        [encoder(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


def probe_encoding_every_epoch(
    encoder: nn.Module,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    classes: int,
    seed: int = 0,
) -> float:
    """train_linear_probe's loop with encoder(images) in place of cached features; best top-1."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dim = encode(encoder, train_images[:1], 1).shape[1]
    probe = ParallelLinearHeads(dim, classes, len(LEARNING_RATES))
    optimizer = torch.optim.SGD(
        [{"params": head.parameters(), "lr": lr} for head, lr in zip(probe.heads, LEARNING_RATES)],
        momentum=0.9,
        weight_decay=0.0,
    )
    steps_per_epoch = max(1, len(train_images) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(train_images), generator=generator)
        for index in order[: steps_per_epoch * batch_size].view(steps_per_epoch, -1):
            with torch.no_grad():
                features = encoder(train_images[index])  # [B, D], the encoder every time
            logits = probe(features)  # [K, B, classes]
            loss = sum(loss_fn(head_logits, train_labels[index]) for head_logits in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    probe.eval()
    with torch.no_grad():
        val_logits = probe(encode(encoder, val_images, batch_size))
    return max(topk_accuracy(logits, val_labels, 1) for logits in val_logits)


def frozen_encoder(encoder_path: Path | None, tiny: bool) -> tuple[nn.Module, str, int]:
    """An exported encoder, or a seeded random init of the demo MAE's; (model, what, size)."""
    if encoder_path is not None:
        source = locate_encoder(encoder_path)
        model = source.create(random_init=False)
        what, image_size = str(encoder_path), source.image_size
    else:
        config = workloads.load("mae", "demo", tiny=tiny)
        torch.manual_seed(0)
        model, _ = build_encoder(
            config.model.name, config.data.image_size, config.model.patch_size, config.model.kwargs
        )
        what, image_size = "random init, demo MAE architecture", config.data.image_size
    set_pooling(model, "avg")
    return model.eval(), what, image_size


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--train-shards", default=str(DEFAULT_TRAIN))
    arguments.add_argument("--val-shards", default=str(DEFAULT_VAL))
    arguments.add_argument("--train-samples", type=int, default=1000)
    arguments.add_argument("--val-samples", type=int, default=1000)
    arguments.add_argument("--epochs", type=int, default=30)
    arguments.add_argument("--batch-size", type=int, default=256)
    arguments.add_argument("--encoder", type=Path, help="an encoder export (default: random init)")
    arguments.add_argument("--tiny", action="store_true", help="test sizes (seconds in all)")
    args = arguments.parse_args(argv)
    device = torch.device("cpu")

    encoder, encoder_name, image_size = frozen_encoder(args.encoder, args.tiny)
    started = time.perf_counter()
    try:
        train_images, train_labels = decoded_images(
            args.train_shards, args.train_samples, image_size
        )
        val_images, val_labels = decoded_images(args.val_shards, args.val_samples, image_size)
    except DataError as error:
        fail(f"{error} (see benchmarks/README.md for the CIFAR-10 shards)")
    decode_s = time.perf_counter() - started
    classes = int(max(train_labels.max(), val_labels.max())) + 1

    started = time.perf_counter()
    train_features = encode(encoder, train_images, args.batch_size)
    val_features = encode(encoder, val_images, args.batch_size)
    extract_s = time.perf_counter() - started
    metrics, _ = train_linear_probe(
        train_features,
        train_labels,
        val_features,
        val_labels,
        learning_rates=LEARNING_RATES,
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_classes=classes,
    )
    cached_s = time.perf_counter() - started

    started = time.perf_counter()
    per_epoch_top1 = probe_encoding_every_epoch(
        encoder,
        train_images,
        train_labels,
        val_images,
        val_labels,
        args.epochs,
        args.batch_size,
        classes,
    )
    per_epoch_s = time.perf_counter() - started

    result = {
        "encoder": encoder_name,
        "train_samples": len(train_images),
        "val_samples": len(val_images),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "decode_s": decode_s,
        "cached": {
            "wall_s": cached_s,
            "extract_s": extract_s,
            "head_training_s": cached_s - extract_s,
            "top1": metrics["top1"],
        },
        "encoder_every_epoch": {"wall_s": per_epoch_s, "top1": per_epoch_top1},
        "speedup": per_epoch_s / cached_s,
        "top1_difference_points": 100 * (metrics["top1"] - per_epoch_top1),
    }
    rows = [
        {"probe": "cached features", "wall s": cached_s, "top-1": metrics["top1"]},
        {"probe": "encoder every epoch", "wall s": per_epoch_s, "top-1": per_epoch_top1},
        {"probe": "speedup", "wall s": result["speedup"], "top-1": None},
    ]
    emit(
        {"benchmark": "probe", "environment": environment(device), "result": result},
        rows,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
