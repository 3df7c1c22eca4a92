"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO).

Each query votes with its k most cosine-similar training samples, a neighbour of similarity s
weighing exp(s / T): close neighbours count much more than the k-th. The scoring itself
(pretrain.knn.knn_scores) is shared with the online monitor of pretraining.
"""

from __future__ import annotations

import torch

from finetune.features import frozen_features
from finetune.job import Job
from finetune.metrics import topk_accuracy
from pretrain.knn import knn_scores

__all__ = ["knn_evaluate", "knn_scores", "run_knn"]


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
