"""Linear probe on cached features (MAE recipe: BatchNorm1d without affine, then Linear).

Several learning rates train at once as parallel heads over the same mini-batches; the best head
on the validation features is reported. Features are extracted once, so 100 epochs take seconds.
"""

from __future__ import annotations

import torch
import torch.nn as nn


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


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    hits = (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)
    return hits.float().mean().item()


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
) -> dict:
    """SGD (momentum 0.9, cosine schedule) on each head; returns the best head's top-1/top-5."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classes = int(max(train_labels.max(), val_labels.max())) + 1
    probe = ParallelLinearHeads(train_features.shape[1], classes, len(learning_rates))
    optimizer = torch.optim.SGD(
        [{"params": head.parameters(), "lr": lr} for head, lr in zip(probe.heads, learning_rates)],
        momentum=0.9,
        weight_decay=weight_decay,
    )
    steps_per_epoch = max(1, len(train_features) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(train_features), generator=generator)
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
    best = max(per_head, key=lambda result: result["top1"])
    return {
        "top1": best["top1"],
        "top5": best["top5"],
        "best_lr": best["lr"],
        "per_lr": per_head,
        "train_samples": len(train_features),
        "val_samples": len(val_features),
    }
