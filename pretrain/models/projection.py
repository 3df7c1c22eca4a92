"""Projection heads that map encoder features into the space where a contrastive loss is taken."""

from __future__ import annotations

import torch.nn as nn


class ProjectionHead(nn.Sequential):
    """SimCLR's MLP: (layers - 1) x [Linear, BatchNorm1d, ReLU], then a Linear without bias.

    The last layer has no bias and no ReLU: the loss normalises its output, and a ReLU would
    confine the embeddings to the positive orthant. Hidden Linears skip their bias because the
    BatchNorm that follows removes it anyway. (B, in_dim) -> (B, out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2):
        if layers < 1:
            raise ValueError(f"a projection head needs at least one layer, got {layers}")
        parts: list[nn.Module] = []
        width = in_dim
        for _ in range(layers - 1):
            parts += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim)]
            parts.append(nn.ReLU(inplace=True))
            width = hidden_dim
        parts.append(nn.Linear(width, out_dim, bias=False))
        super().__init__(*parts)
