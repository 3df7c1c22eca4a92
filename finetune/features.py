"""One pass of a frozen encoder over shards -> cached (features [N, D], labels [N])."""

from __future__ import annotations

import torch
from tqdm import tqdm

from pretrain.data import eval_loader, expand_shards
from pretrain.data.transforms import eval_transform


def set_pooling(encoder: torch.nn.Module, pool: str | None) -> None:
    """'avg' (mean of patch tokens) or 'token' (cls) for timm models that pool tokens."""
    if pool and isinstance(getattr(encoder, "global_pool", None), str):
        encoder.reset_classifier(0, global_pool=pool)


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    shards: str,
    image_size: int,
    batch_size: int = 256,
    num_workers: int = 2,
    description: str = "features",
    device: str | torch.device = "cpu",
    max_samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] and labels [N] of the shards, in shard order; the first `max_samples`
    samples only when given (a cheaper probe on a large training split)."""
    loader = eval_loader(
        expand_shards(shards),
        eval_transform(image_size),
        batch_size=batch_size,
        rank=0,
        world_size=1,
        num_workers=num_workers,
    )
    encoder = encoder.to(device).eval()
    features, labels, seen = [], [], 0
    for batch in tqdm(loader, desc=description, unit="batch", leave=False):
        if "label" not in batch:
            raise ValueError(f"the shards {shards} carry no class labels (cls) to probe with")
        features.append(encoder(batch["image"].to(device)).float().cpu())  # [B, D]
        labels.append(batch["label"])
        seen += len(batch["label"])
        if max_samples and seen >= max_samples:
            break
    if not features:
        raise ValueError(f"no samples could be read from {shards}")
    limit = max_samples or None
    return torch.cat(features)[:limit], torch.cat(labels)[:limit]
