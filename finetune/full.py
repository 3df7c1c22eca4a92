"""Full finetuning: the pretrained encoder plus a new head, trained end to end.

The MAE/BEiT recipe through timm's own pieces: layer-wise lr decay over timm's parameter
groups (`param_groups_layer_decay`: block i of depth d at lr * decay ** (d - i), the patch
embedding one step below block 0, the final norm with the last block, the head at lr), drop path
(`drop_path_rate`), label smoothing, optional mixup/cutmix (`timm.data.Mixup`), AdamW, linear
warmup then cosine in optimizer steps. Runs on any number of processes (Accelerate; the shard
loaders are split by rank, never passed through `prepare`), saves a checkpoint and evaluates
on the val shards after every epoch, and exports the finetuned classifier at the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from accelerate import Accelerator
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from tqdm import tqdm

from finetune.config import DataSettings, FullSettings
from finetune.encoder import EncoderSource, build_classifier
from finetune.features import SampleTransform, shards_covering
from finetune.report import Report
from pretrain.checkpoint import export_encoder, latest_checkpoint, load_checkpoint, save_checkpoint
from pretrain.config import ConfigError
from pretrain.data import DataError, count_samples, eval_loader, train_loader
from pretrain.data.transforms import ImageTransform, eval_transform
from pretrain.distributed import mean_across_processes, sum_across_processes
from pretrain.engine import learning_rate


def build_optimizer(model: nn.Module, settings: FullSettings, base_lr: float):
    """AdamW over timm's layer-decay groups; each group keeps its `lr_scale` for
    `set_learning_rate`. No weight decay on 1-D parameters and the model's no_weight_decay()
    (position embeddings, class token)."""
    skip = list(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else []
    groups = param_groups_layer_decay(
        model,
        weight_decay=settings.weight_decay,
        no_weight_decay_list=skip,
        layer_decay=settings.layer_decay,
    )
    return torch.optim.AdamW(groups, lr=base_lr, betas=settings.betas)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def train_transform(settings: FullSettings, image_size: int, mean, std) -> ImageTransform:
    """timm's training augmentation: random resized crop, flip, colour jitter or RandAugment."""
    return ImageTransform(
        create_transform(
            image_size,
            is_training=True,
            scale=(settings.crop_scale_min, 1.0),
            auto_augment=settings.auto_augment,
            interpolation="bicubic",
            mean=mean,
            std=std,
        )
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    urls: list[str],
    transform,
    accelerator: Accelerator,
    num_classes: int,
    data: DataSettings,
) -> tuple[float, float, torch.Tensor]:
    """top-1, top-5 and the confusion matrix [C, C] over all val samples (each exactly once,
    split by process, counts summed)."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    totals = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, samples
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loader = eval_loader(
        urls,
        transform,
        data.batch_size,
        accelerator.process_index,
        accelerator.num_processes,
        data.num_workers,
    )
    for batch in loader:
        if "label" not in batch:
            raise DataError("the val shards carry no class labels (cls)")
        images, labels = batch["image"].to(device), batch["label"].to(device)
        with accelerator.autocast():
            logits = model(images).float()  # [B, C]
        top5 = logits.topk(min(5, num_classes), dim=1).indices  # [B, 5]
        totals[0] += (top5[:, 0] == labels).sum()
        totals[1] += (top5 == labels[:, None]).any(dim=1).sum()
        totals[2] += len(labels)
        confusion += torch.bincount(labels * num_classes + top5[:, 0], minlength=confusion.numel())
    totals = sum_across_processes(accelerator, totals)
    confusion = sum_across_processes(accelerator, confusion).view(num_classes, num_classes)
    model.train(was_training)
    count = max(1.0, totals[2].item())
    return totals[0].item() / count, totals[1].item() / count, confusion.cpu()


def finetune(
    source: EncoderSource,
    settings: FullSettings,
    data: DataSettings,
    train_urls: list[str],
    val_urls: list[str],
    num_classes: int,
    accelerator: Accelerator,
    work_dir: Path,
    report: Report,
    random_init: bool = False,
    resume: bool = False,
) -> tuple[dict, torch.Tensor]:
    """Train, evaluating and checkpointing (work_dir/checkpoints) after each epoch; export the
    classifier to work_dir/export. Returns (result, last confusion matrix [C, C])."""
    started = time.perf_counter()
    is_main, rank, world = (
        accelerator.is_main_process,
        accelerator.process_index,
        accelerator.num_processes,
    )
    image_size = data.image_size or source.image_size
    train_urls = shards_covering(train_urls, data.train_samples)  # whole shards, no subset
    train_samples = count_samples(train_urls)
    global_batch = settings.batch_size * world
    steps_per_epoch = settings.steps_per_epoch or (train_samples or 0) // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(
            "set full.steps_per_epoch: the train shards have no index with sample counts"
            if train_samples is None
            else f"{train_samples} train samples make no full global batch of {global_batch}"
        )
    checkpoint = latest_checkpoint(work_dir)
    if checkpoint is not None and not resume:
        raise ConfigError(
            f"{work_dir} already holds a finetuning checkpoint; pass --resume to continue it "
            "or choose another --output"
        )

    model, kwargs = build_classifier(
        source,
        num_classes,
        data.pool,
        random_init,
        seed=settings.seed,
        drop_path_rate=settings.drop_path,
    )
    base_lr = settings.lr or settings.blr * global_batch / 256
    optimizer = build_optimizer(model, settings, base_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_epoch, history = 0, []
    if checkpoint is not None:
        model_state, optimizer_state, state = load_checkpoint(checkpoint)
        accelerator.unwrap_model(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        start_epoch, history = state["epoch"], state["history"]

    mixup = None
    if settings.mixup > 0 or settings.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=settings.mixup,
            cutmix_alpha=settings.cutmix,
            label_smoothing=settings.label_smoothing,
            num_classes=num_classes,
        )
        loss_fn = SoftTargetCrossEntropy()  # mixup's targets are soft and already smoothed
    else:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    sample_transform = train_transform(settings, image_size, source.mean, source.std)
    val_transform = SampleTransform(
        eval_transform(image_size, source.mean, source.std, data.crop_fraction).image_transform
    )
    total_steps = settings.epochs * steps_per_epoch
    warmup_steps = round(settings.warmup_epochs * steps_per_epoch)
    if is_main:
        print(
            f"full finetune of {source.name}{' (random init)' if random_init else ''}: "
            f"{world} process(es) on {accelerator.device}, {steps_per_epoch} steps/epoch, "
            f"global batch {global_batch}, lr {base_lr:.3g}, layer decay {settings.layer_decay}",
            file=sys.stderr,
        )

    model.train()
    for epoch in range(start_epoch, settings.epochs):
        loader = train_loader(
            train_urls,
            sample_transform,
            batch_size=settings.batch_size,
            steps_per_epoch=steps_per_epoch,
            epoch=epoch,
            seed=settings.seed,
            rank=rank,
            world_size=world,
            num_workers=data.num_workers,
            shuffle_buffer=settings.shuffle_buffer,
        )
        losses = torch.zeros((), device=accelerator.device)
        epoch_started = time.perf_counter()
        for step_in_epoch, batch in enumerate(
            tqdm(loader, desc=f"epoch {epoch + 1}", disable=not is_main, leave=False)
        ):
            step = epoch * steps_per_epoch + step_in_epoch
            _seed_step(settings.seed, step, rank)  # drop path and mixup draws
            lr = learning_rate(step, base_lr, warmup_steps, total_steps, settings.min_lr)
            set_learning_rate(optimizer, lr)
            if "label" not in batch:
                raise DataError("the train shards carry no class labels (cls)")
            images = batch["image"].to(accelerator.device, non_blocking=True)
            targets = batch["label"].to(accelerator.device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)  # targets: [B, C] soft
            with accelerator.autocast():
                loss = loss_fn(model(images), targets)
            accelerator.backward(loss)
            if settings.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), settings.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses += loss.detach().float()
        top1, top5, confusion = evaluate(
            accelerator.unwrap_model(model),
            val_urls,
            val_transform,
            accelerator,
            num_classes,
            data,
        )
        metrics = {
            "epoch": epoch + 1,
            "train_loss": mean_across_processes(accelerator, losses / steps_per_epoch).item(),
            "lr": lr,
            "val_top1": top1,
            "val_top5": top5,
            "img_per_s": steps_per_epoch * global_batch / (time.perf_counter() - epoch_started),
        }
        history.append(metrics)
        report.log(metrics, step=(epoch + 1) * steps_per_epoch)
        if is_main:
            print(_metrics_line(metrics), file=sys.stderr, flush=True)
            save_checkpoint(
                work_dir,
                (epoch + 1) * steps_per_epoch,
                accelerator.unwrap_model(model).state_dict(),
                optimizer.state_dict(),
                {"epoch": epoch + 1, "history": history},
                keep=settings.keep_checkpoints,
            )
        accelerator.wait_for_everyone()

    if start_epoch >= settings.epochs:  # resumed a finished run: evaluate its final weights
        top1, top5, confusion = evaluate(
            accelerator.unwrap_model(model), val_urls, val_transform, accelerator, num_classes, data
        )
    result = {
        "top1": top1,
        "top5": top5,
        "best_top1": max(entry["val_top1"] for entry in history) if history else top1,
        "epochs": settings.epochs,
        "steps_per_epoch": steps_per_epoch,
        "global_batch": global_batch,
        "lr": base_lr,
        "train_samples": train_samples,
        "val_samples": int(confusion.sum()),
        "history": history,
    }
    if is_main:
        meta = {
            "task": "classification",
            "num_classes": num_classes,
            "finetuned_from": str(source.card_path),
            "random_init": random_init,
            "image_size": image_size,
            "mean": list(source.mean),
            "std": list(source.std),
            "top1": top1,
        }
        state = accelerator.unwrap_model(model).state_dict()
        weights, _ = export_encoder(work_dir, state, source.card["timm_name"], kwargs, meta)
        result["export"] = str(weights)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    accelerator.wait_for_everyone()
    return result, confusion


def _seed_step(seed: int, step: int, rank: int) -> None:
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    torch.manual_seed(mixed)
    np.random.seed(mixed & 0xFFFF_FFFF)


def _metrics_line(metrics: dict) -> str:
    return " ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in metrics.items()
    )
