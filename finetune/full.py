"""Full finetuning: the pretrained encoder plus a new head, trained end to end.

The MAE/BEiT recipe through timm's own pieces: layer-wise lr decay over timm's parameter
groups (`param_groups_layer_decay`: block i of depth d at lr * decay ** (d - i), the patch
embedding one step below block 0, the final norm with the last block, the head at lr), drop path
(`drop_path_rate`), label smoothing, optional mixup/cutmix (`timm.data.Mixup`), AdamW, linear
warmup then cosine in optimizer steps. Runs on any number of processes (Accelerate; the shard
loaders are split by rank, never passed through `prepare`), saves a checkpoint and evaluates
on the val shards after every epoch, and exports the finetuned classifier at the end. Each
optimizer step is pretraining's own (pretrain.step): gradient accumulation (full.grad_accum),
clipping, and the skip of non-finite steps on every rank.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from accelerate import Accelerator
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from tqdm import tqdm

from finetune.config import DataConfig, FullConfig
from finetune.encoder import build_classifier
from finetune.features import SampleTransform, shards_covering
from finetune.guards import cached_linear_probe, chance_level_warning
from finetune.job import Job
from finetune.report import Report
from pretrain.checkpoint import export_encoder, latest_checkpoint, load_checkpoint, save_checkpoint
from pretrain.data import count_samples, eval_loader, train_loader
from pretrain.data.transforms import ImageTransform, eval_transform
from pretrain.distributed import mean_across_processes, sum_across_processes
from pretrain.errors import ConfigError, DataError, ModelError
from pretrain.faults import NonFiniteGuard
from pretrain.hub import write_hub_layout
from pretrain.optim import learning_rate, optimizer_phases, scaled_lr
from pretrain.step import optimizer_step, seed_step


def build_optimizer(model: nn.Module, settings: FullConfig, base_lr: float):
    """AdamW over timm's layer-decay groups; each group keeps its `lr_scale`, which
    pretrain.optim.set_learning_rate applies. No weight decay on 1-D parameters and the model's
    no_weight_decay() (position embeddings, class token)."""
    skip = list(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else []
    groups = param_groups_layer_decay(
        model,
        weight_decay=settings.weight_decay,
        no_weight_decay_list=skip,
        layer_decay=settings.layer_decay,
    )
    return torch.optim.AdamW(groups, lr=base_lr, betas=settings.betas)


def train_transform(settings: FullConfig, image_size: int, mean, std) -> ImageTransform:
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
    data: DataConfig,
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


@dataclass
class _Plan:
    """A finetuning run's sizes and inputs, settled before anything is built."""

    train_urls: list[str]  # whole shards covering data.train_samples
    train_samples: int | None  # per the shard indexes
    image_size: int
    global_batch: int  # batch_size x processes x grad_accum
    steps_per_epoch: int  # optimizer steps
    warmup_steps: int
    total_steps: int  # over all epochs
    base_lr: float
    sample_transform: ImageTransform
    val_transform: SampleTransform


def _plan(job: Job) -> _Plan:
    settings, data, source = job.config.full, job.config.data, job.source
    image_size = data.image_size or source.image_size
    train_urls = shards_covering(job.train_urls, data.train_samples)  # whole shards, no subset
    train_samples = count_samples(train_urls)
    global_batch = settings.batch_size * job.accelerator.num_processes * settings.grad_accum
    steps_per_epoch = settings.steps_per_epoch or (train_samples or 0) // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(
            "set full.steps_per_epoch: the train shards have no index with sample counts"
            if train_samples is None
            else f"{train_samples} train samples make no full global batch of {global_batch}"
        )
    val_transform = SampleTransform(
        eval_transform(image_size, source.mean, source.std, data.crop_fraction).image_transform
    )
    return _Plan(
        train_urls=train_urls,
        train_samples=train_samples,
        image_size=image_size,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=round(settings.warmup_epochs * steps_per_epoch),
        total_steps=settings.epochs * steps_per_epoch,
        base_lr=scaled_lr(settings.blr, settings.lr, global_batch),
        sample_transform=train_transform(settings, image_size, source.mean, source.std),
        val_transform=val_transform,
    )


class _Criterion:
    """The training loss of a batch: mixup/cutmix when on (soft targets), label smoothing."""

    def __init__(self, settings: FullConfig, num_classes: int):
        self.mixup = None
        if settings.mixup > 0 or settings.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=settings.mixup,
                cutmix_alpha=settings.cutmix,
                label_smoothing=settings.label_smoothing,
                num_classes=num_classes,
            )
            self.loss = SoftTargetCrossEntropy()  # mixup's targets are soft and already smoothed
        else:
            self.loss = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)

    def __call__(self, model: nn.Module, batch: dict, accelerator: Accelerator) -> torch.Tensor:
        if "label" not in batch:
            raise DataError("the train shards carry no class labels (cls)")
        images = batch["image"].to(accelerator.device, non_blocking=True)
        targets = batch["label"].to(accelerator.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)  # targets: [B, C] soft
        with accelerator.autocast():
            return self.loss(model(images), targets)


def finetune(job: Job, random_init: bool, report: Report) -> tuple[dict, torch.Tensor]:
    """Train, evaluating and checkpointing (OUTPUT/<result name>/checkpoints) after each epoch;
    export the classifier to OUTPUT/<result name>/export. Returns (result, last confusion
    matrix [C, C])."""
    started = time.perf_counter()
    settings, accelerator = job.config.full, job.accelerator
    num_classes, work_dir = len(job.class_names), job.output_dir / report.name
    plan = _plan(job)
    checkpoint = latest_checkpoint(work_dir)
    if checkpoint is not None and not job.resume:
        raise ConfigError(
            f"{work_dir} already holds a finetuning checkpoint; pass --resume to continue it "
            "or choose another --output"
        )
    model, kwargs = _classifier(job, plan, num_classes, random_init)
    optimizer = build_optimizer(model, settings, plan.base_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_epoch, history = 0, []
    if checkpoint is not None:
        model_state, optimizer_state, state = load_checkpoint(checkpoint)
        accelerator.unwrap_model(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        start_epoch, history = state["epoch"], state["history"]
    _print_start(job, plan, random_init)

    criterion = _Criterion(settings, num_classes)
    guard = NonFiniteGuard(settings.max_nonfinite_steps)
    model.train()
    for epoch in range(start_epoch, settings.epochs):
        metrics = _train_epoch(job, plan, model, optimizer, criterion, guard, epoch)
        top1, top5, confusion = _evaluate_job(job, plan, accelerator.unwrap_model(model))
        speed = metrics.pop("img_per_s")  # after the val figures, as in every result
        metrics = {**metrics, "val_top1": top1, "val_top5": top5, "img_per_s": speed}
        history.append(metrics)
        report.log(metrics, step=(epoch + 1) * plan.steps_per_epoch)
        if accelerator.is_main_process:
            print(_metrics_line(metrics), file=sys.stderr, flush=True)
            if epoch == 0 and (warning := _first_epoch_warning(job, plan, history)):
                print(warning, file=sys.stderr, flush=True)
            save_checkpoint(
                work_dir,
                (epoch + 1) * plan.steps_per_epoch,
                accelerator.unwrap_model(model).state_dict(),
                optimizer.state_dict(),
                {"epoch": epoch + 1, "history": history},
                keep=settings.keep_checkpoints,
            )
        accelerator.wait_for_everyone()
    if start_epoch >= settings.epochs:  # resumed a finished run: evaluate its final weights
        top1, top5, confusion = _evaluate_job(job, plan, accelerator.unwrap_model(model))
    result = {
        "top1": top1,
        "top5": top5,
        "best_top1": max(entry["val_top1"] for entry in history) if history else top1,
        "epochs": settings.epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "global_batch": plan.global_batch,
        "lr": plan.base_lr,
        "train_samples": plan.train_samples,
        "val_samples": int(confusion.sum()),
        "history": history,
        "warnings": [line for line in [_first_epoch_warning(job, plan, history)] if line],
    }
    if accelerator.is_main_process:
        state = accelerator.unwrap_model(model).state_dict()
        result["export"] = str(_export(job, plan, state, kwargs, random_init, top1))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    accelerator.wait_for_everyone()
    return result, confusion


def _classifier(job: Job, plan: _Plan, num_classes: int, random_init: bool):
    """build_classifier with full.drop_path, which only models with stochastic depth take
    (timm's ViTs and ResNets do, the project's dcgan_encoder does not): passed only when set."""
    settings = job.config.full
    build = partial(
        build_classifier, job.source, num_classes, job.config.data.pool, random_init,
        seed=settings.seed, image_size=plan.image_size,
    )  # fmt: skip
    if not settings.drop_path:
        return build()
    try:
        return build(drop_path_rate=settings.drop_path)
    except ModelError:
        build()  # without drop path it builds: drop path is what the model refused
        name = job.source.card["timm_name"]
        raise ConfigError(f"{name} has no drop path; set full.drop_path=0") from None


def _train_epoch(job, plan, model, optimizer, criterion, guard, epoch: int) -> dict:
    """One epoch of optimizer steps; {"epoch", "train_loss", "train_loss_end", "lr",
    "img_per_s"}: the mean training loss of the epoch, and of its last quarter (where the epoch
    left the model; the chance-level check reads it)."""
    settings, accelerator = job.config.full, job.accelerator
    accum, rank = settings.grad_accum, accelerator.process_index
    loader = train_loader(
        plan.train_urls,
        plan.sample_transform,
        batch_size=settings.batch_size,
        steps_per_epoch=plan.steps_per_epoch * accum,  # micro-batches
        epoch=epoch,
        seed=settings.seed,
        rank=rank,
        world_size=accelerator.num_processes,
        num_workers=job.config.data.num_workers,
        shuffle_buffer=settings.shuffle_buffer,
    )
    is_main = accelerator.is_main_process
    batches = iter(tqdm(loader, desc=f"epoch {epoch + 1}", disable=not is_main, leave=False))
    phases = optimizer_phases(accelerator.unwrap_model(model))
    losses = torch.zeros(plan.steps_per_epoch, device=accelerator.device)  # [steps], per step
    tail = slice(plan.steps_per_epoch - max(1, plan.steps_per_epoch // 4), None)

    def add_loss(outputs: dict, phase: str) -> None:
        losses[step_in_epoch] += outputs["loss"].detach().float() / accum

    started = time.perf_counter()
    for step_in_epoch in range(plan.steps_per_epoch):
        step = epoch * plan.steps_per_epoch + step_in_epoch
        micro_batches = [next(batches) for _ in range(accum)]
        seed_step(settings.seed, step, rank)  # drop path and mixup draws
        lr = learning_rate(step, plan.base_lr, plan.warmup_steps, plan.total_steps, settings.min_lr)
        result = optimizer_step(
            accelerator, model, phases, [optimizer], micro_batches,
            lambda batch, phase: {"loss": criterion(model, batch, accelerator)},
            lr, settings.clip_grad, add_loss,
        )  # fmt: skip
        guard.record(result.finite, step + 1)
    means = mean_across_processes(accelerator, torch.stack([losses.mean(), losses[tail].mean()]))
    return {
        "epoch": epoch + 1,
        "train_loss": means[0].item(),
        "train_loss_end": means[1].item(),
        "lr": lr,
        "img_per_s": plan.steps_per_epoch * plan.global_batch / (time.perf_counter() - started),
    }


def _first_epoch_warning(job: Job, plan: _Plan, history: list[dict]) -> str | None:
    """The chance-level warning of the first epoch (finetune.guards), if it has one."""
    if not history:
        return None
    loss = history[0].get("train_loss_end", history[0]["train_loss"])
    return chance_level_warning(loss, len(job.class_names), plan.base_lr, job.config.full)


def _evaluate_job(job: Job, plan: _Plan, model: nn.Module):
    return evaluate(
        model,
        job.val_urls,
        plan.val_transform,
        job.accelerator,
        len(job.class_names),
        job.config.data,
    )


def _print_start(job: Job, plan: _Plan, random_init: bool) -> None:
    if job.accelerator.is_main_process:
        settings = job.config.full
        print(
            f"full finetune of {job.source.name}{' (random init)' if random_init else ''}: "
            f"{job.accelerator.num_processes} process(es) on {job.accelerator.device}, "
            f"{plan.steps_per_epoch} steps/epoch, global batch {plan.global_batch}, "
            f"lr {plan.base_lr:.3g}, layer decay {settings.layer_decay}",
            file=sys.stderr,
        )


def _export(job: Job, plan: _Plan, state: dict, kwargs: dict, random_init: bool, top1: float):
    """The finetuned classifier, as timm rebuilds it: OUTPUT/<result name>/export."""
    source = job.source
    meta = {
        "task": "classification",
        "num_classes": len(job.class_names),
        "label_names": list(job.class_names),
        "finetuned_from": source.location,
        "random_init": random_init,
        "image_size": plan.image_size,
        "mean": list(source.mean),
        "std": list(source.std),
        "top1": top1,
    }
    work_dir = job.output_dir / job.result_name(random_init)
    weights, _ = export_encoder(work_dir, state, source.card["timm_name"], kwargs, meta)
    write_hub_layout(weights.parent, source.card["timm_name"], kwargs, meta)
    return weights


def _metrics_line(metrics: dict) -> str:
    return " ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in metrics.items()
    )


def run_full(job: Job, random_init: bool) -> dict | None:
    """`finetune full`: the result (main process), with the confusion matrix."""
    if not job.class_names:
        raise ConfigError(
            "full finetuning needs the class count: the shard index names no classes; "
            "pass --classes a,b,c"
        )
    report = job.report(random_init)
    result, confusion = finetune(job, random_init, report)
    if not job.accelerator.is_main_process:
        return None
    probe = cached_linear_probe(job.output_dir, job.source, random_init, result["val_samples"])
    # the encoder's own linear probe right after the finetuned top-1, where it is compared
    result = {**job.describe(random_init), "top1": result["top1"], **probe, **result}
    title = job.title("full finetune", random_init)
    result.update(report.confusion_from_matrix(confusion, job.class_names, title))
    report.finish(result)
    return result
