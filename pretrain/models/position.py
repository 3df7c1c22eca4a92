"""Fixed 2D sine-cosine position embeddings (MAE, section A.1)."""

from __future__ import annotations

import torch


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Row-major (h, w) grid -> [grid_h * grid_w, dim]; half of the channels encode h, half w."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]

    def encode(positions: torch.Tensor) -> torch.Tensor:  # [L] -> [L, D/2]
        angles = positions.reshape(-1, 1) * frequencies.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # [L, D]
