"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO).

Each query votes with its k most cosine-similar training samples, a neighbour of similarity s
weighing exp(s / T): close neighbours count much more than the k-th.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.features import frozen_features
from finetune.job import Job
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


def run_knn(job: Job, random_init: bool) -> dict | None:
    """`finetune knn` on the job's frozen features; the result (main process)."""
    train, val, cached = frozen_features(job, random_init)
    if not job.accelerator.is_main_process:
        return None
    settings = job.config.knn
    report = job.report(random_init)
    classes = job.num_classes(train.labels, val.labels)
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
    result = {
        **job.describe(random_init),
        **metrics,
        "features_cached": cached,
        "skipped_samples": train.skipped + val.skipped,
    }
    title = job.title(f"kNN k={settings.k}", random_init)
    result.update(report.confusion(scores, val.labels, classes, job.class_names, title))
    report.finish(result)
    return result
