"""Weighted k-nearest-neighbour scores on L2-normalised features (Wu et al. 2018; DINO): the
maths shared by `finetune knn` and the online monitor of pretraining (pretrain.monitor).

Each query votes with its k most cosine-similar bank samples, a neighbour of similarity s
weighing exp(s / T): close neighbours count much more than the k-th.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Class scores [Q, C]: sum of exp(cos / T) over each query's k nearest training samples.

    train_features [N, D], train_labels [N], query_features [Q, D]; queries go in chunks so the
    similarity matrix never exceeds [chunk, N]. exclude_self: the queries ARE the training
    samples (Q == N, same order), and each is scored by its k nearest others (leave-one-out).
    """
    train = F.normalize(train_features.float(), dim=1)  # [N, D]
    k = min(k, len(train) - 1 if exclude_self else len(train))
    scores = []
    for start in range(0, len(query_features), chunk):
        query = F.normalize(query_features[start : start + chunk].float(), dim=1)  # [q, D]
        similarity = query @ train.T  # [q, N]
        if exclude_self:
            rows = torch.arange(len(query), device=query.device)
            similarity[rows, start + rows] = -float("inf")
        similarity, neighbours = similarity.topk(k, dim=1)  # [q, k] each
        weights = (similarity / temperature).exp()  # [q, k]
        votes = torch.zeros(len(query), num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[neighbours], weights)  # [q, C]
        scores.append(votes)
    return torch.cat(scores)
