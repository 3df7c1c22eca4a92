"""Linear probe on cached features (MAE recipe: BatchNorm1d without affine, then Linear).

Several learning rates train at once as parallel heads over the same mini-batches; the best head
on the validation features is reported. Features are extracted once, so 100 epochs take seconds.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from finetune.features import frozen_features
from finetune.job import Job
from finetune.metrics import topk_accuracy


class ParallelLinearHeads(nn.Module):
    def __init__(self, dim: int, classes: int, count: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.heads = nn.ModuleList(nn.Linear(dim, classes) for _ in range(count))
        for head in self.heads:
            nn.init.trunc_normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        normed = self.norm(features)  # [B, D]
        return torch.stack([head(normed) for head in self.heads])  # [K, B, classes]


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    learning_rates=(0.01, 0.03, 0.1, 0.3, 1.0),
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict, torch.Tensor]:
    """SGD (momentum 0.9, cosine schedule) on each head.

    Returns the best head's metrics (top-1/top-5 on val, its lr, every head's results) and
    its val logits [N_val, classes] (CPU).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    train_features, train_labels = train_features.to(device), train_labels.to(device)
    val_features, val_labels = val_features.to(device), val_labels.to(device)
    probe = ParallelLinearHeads(train_features.shape[1], classes, len(learning_rates)).to(device)
    optimizer = torch.optim.SGD(
        [{"params": head.parameters(), "lr": lr} for head, lr in zip(probe.heads, learning_rates)],
        momentum=0.9,
        weight_decay=weight_decay,
    )
    steps_per_epoch = max(1, len(train_features) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(train_features), generator=generator).to(device)
        for index in order[: steps_per_epoch * batch_size].view(steps_per_epoch, -1):
            logits = probe(train_features[index])  # [K, B, classes]
            # Sum over heads: each head's gradient only comes from its own loss term.
            loss = sum(loss_fn(head_logits, train_labels[index]) for head_logits in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    probe.eval()
    with torch.no_grad():
        val_logits = probe(val_features)
    per_head = [
        {
            "lr": lr,
            "top1": topk_accuracy(logits, val_labels, 1),
            "top5": topk_accuracy(logits, val_labels, 5),
        }
        for lr, logits in zip(learning_rates, val_logits)
    ]
    best = max(range(len(per_head)), key=lambda head: per_head[head]["top1"])
    metrics = {
        "top1": per_head[best]["top1"],
        "top5": per_head[best]["top5"],
        "best_lr": per_head[best]["lr"],
        "per_lr": per_head,
        "train_samples": len(train_features),
        "val_samples": len(val_features),
    }
    return metrics, val_logits[best].cpu()


def run_linear(job: Job, random_init: bool) -> dict | None:
    """`finetune linear`: the probe on the job's frozen features; the result (main process)."""
    train, val, cached = frozen_features(job, random_init)
    if not job.accelerator.is_main_process:
        return None
    settings = job.config.linear
    report = job.report(random_init)
    classes = job.num_classes(train.labels, val.labels)
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
    result = {
        **job.describe(random_init),
        **metrics,
        "epochs": settings.epochs,
        "features_cached": cached,
        "skipped_samples": train.skipped + val.skipped,
    }
    title = job.title("linear probe", random_init)
    result.update(report.confusion(logits, val.labels, classes, job.class_names, title))
    report.finish(result)
    return result
