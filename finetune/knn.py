"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO).

Each query votes with its k most cosine-similar training samples, a neighbour of similarity s
weighing exp(s / T): close neighbours count much more than the k-th.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.metrics import topk_accuracy


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores [Q, C]: sum of exp(cos / T) over each query's k nearest training samples.

    train_features [N, D], train_labels [N], query_features [Q, D]; queries go in chunks so the
    similarity matrix never exceeds [chunk, N].
    """
    train = F.normalize(train_features.float(), dim=1)  # [N, D]
    k = min(k, len(train))
    scores = []
    for start in range(0, len(query_features), chunk):
        query = F.normalize(query_features[start : start + chunk].float(), dim=1)  # [q, D]
        similarity, neighbours = (query @ train.T).topk(k, dim=1)  # [q, k] each
        weights = (similarity / temperature).exp()  # [q, k]
        votes = torch.zeros(len(query), num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[neighbours], weights)  # [q, C]
        scores.append(votes)
    return torch.cat(scores)


def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    device: str | torch.device = "cpu",
) -> tuple[dict, torch.Tensor]:
    """Top-1/top-5 of weighted kNN on val; returns (metrics, val scores [N_val, C] on CPU)."""
    classes = num_classes or int(max(train_labels.max(), val_labels.max())) + 1
    scores = knn_scores(
        train_features.to(device),
        train_labels.to(device),
        val_features.to(device),
        classes,
        k,
        temperature,
    ).cpu()
    metrics = {
        "top1": topk_accuracy(scores, val_labels, 1),
        "top5": topk_accuracy(scores, val_labels, 5),
        "k": k,
        "temperature": temperature,
        "train_samples": len(train_features),
        "val_samples": len(val_features),
    }
    return metrics, scores
