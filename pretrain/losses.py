"""Contrastive losses as pure functions: no collectives, no module state.

Every loss scores this process's B local rows against candidates from the global batch of N
rows (N = world_size * B, gathered WITH gradient by pretrain.distributed.gather_with_grad). Rows
offset..offset+B of the global tensors are this process's own, so its positives sit at columns
offset + arange(B). Each loss is normalised so that the MEAN of the per-process losses equals the
single-process loss on the global batch; averaging gradients across processes (what DDP does)
then gives the single-process gradient. Without the *_all tensors each loss uses local
negatives only, which is also the plain single-process loss.

Shapes: B local rows, N global rows, D feature width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _global_view(
    local: torch.Tensor, everyone: torch.Tensor | None, offset: int, name: str
) -> tuple[torch.Tensor, int]:
    """The candidate rows (N, D) and the offset of the local rows among them."""
    if local.ndim != 2:
        raise ValueError(f"{name}: expected (B, D) features, got shape {tuple(local.shape)}")
    if everyone is None:
        if offset != 0:
            raise ValueError(f"{name}: offset={offset} needs the global features as well")
        return local, 0
    if everyone.ndim != 2 or everyone.shape[1] != local.shape[1]:
        raise ValueError(
            f"{name}: global features {tuple(everyone.shape)} do not match local "
            f"{tuple(local.shape)} in width"
        )
    if not 0 <= offset <= everyone.shape[0] - local.shape[0]:
        raise ValueError(
            f"{name}: offset {offset} + {local.shape[0]} local rows exceeds the "
            f"{everyone.shape[0]} global rows"
        )
    return everyone, offset


def _both_or_neither(first: torch.Tensor | None, second: torch.Tensor | None, names: str) -> None:
    if (first is None) != (second is None):
        raise ValueError(f"pass both {names} or neither")


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float | torch.Tensor,
    z1_all: torch.Tensor | None = None,
    z2_all: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al., 2020, eq. 1) over the 2B local anchors.

    z1, z2: (B, D) two views of the same B images; z1_all, z2_all: (N, D) the same for the global
    batch. Each anchor is scored against all 2N views except itself (cosine / temperature); its
    positive is the other view of its image. Returns the mean cross-entropy over the 2B anchors.
    """
    _both_or_neither(z1_all, z2_all, "z1_all and z2_all")
    if z1.shape != z2.shape:
        raise ValueError(f"nt_xent: views differ in shape, {tuple(z1.shape)} vs {tuple(z2.shape)}")
    batch = z1.shape[0]
    view1_all, offset = _global_view(z1, z1_all, offset, "nt_xent")
    view2_all, _ = _global_view(z2, z2_all, offset, "nt_xent")
    if view1_all.shape != view2_all.shape:
        raise ValueError("nt_xent: z1_all and z2_all differ in shape")
    total = view1_all.shape[0]

    anchors = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, D): view 1 rows, then view 2 rows
    candidates = F.normalize(torch.cat([view1_all, view2_all]), dim=1)  # (2N, D), same order
    logits = anchors @ candidates.T / temperature  # (2B, 2N)

    local = offset + torch.arange(batch, device=z1.device)  # (B,) global index of local images
    own_column = torch.cat([local, total + local])  # (2B,) where each anchor meets itself
    positive_column = torch.cat([total + local, local])  # (2B,) the other view of the same image
    rows = torch.arange(2 * batch, device=z1.device)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, own_column] = True
    logits = logits.masked_fill(is_self, float("-inf"))
    return F.cross_entropy(logits, positive_column)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    image_all: torch.Tensor | None = None,
    text_all: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al., 2021, Figure 3) over the B local pairs.

    image_features, text_features: (B, D); image_all, text_all: (N, D) the global batch.
    logit_scale: the multiplier itself (exp'ed and clamped by the caller). Local images are
    classified among all N texts and local texts among all N images, the positive at column
    offset + i. Returns (CE_image_to_text + CE_text_to_image) / 2, each a mean over local rows.
    """
    _both_or_neither(image_all, text_all, "image_all and text_all")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"clip_loss: image {tuple(image_features.shape)} and text "
            f"{tuple(text_features.shape)} features differ in shape"
        )
    images_all, offset = _global_view(image_features, image_all, offset, "clip_loss")
    texts_all, _ = _global_view(text_features, text_all, offset, "clip_loss")
    images = F.normalize(image_features, dim=1)  # (B, D)
    texts = F.normalize(text_features, dim=1)  # (B, D)
    image_to_text = logit_scale * images @ F.normalize(texts_all, dim=1).T  # (B, N)
    text_to_image = logit_scale * texts @ F.normalize(images_all, dim=1).T  # (B, N)
    labels = offset + torch.arange(images.shape[0], device=images.device)  # (B,)
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    image_all: torch.Tensor | None = None,
    text_all: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023, Algorithm 1) over the local image rows.

    Local images (B, D) are paired with all N texts: label +1 for the matching pair, -1 for the
    rest; loss = -(1/B) * sum_{i local, j} log sigmoid(label_ij * (scale * cos_ij + bias)).
    Across processes the local rows cover each of the N*N pairs once, so the mean over processes
    is the paper's (1/N) * sum over all pairs. Only text_all enters the sum; image_all is checked
    for shape and otherwise unused (the CLIP losses share one calling convention).
    """
    _both_or_neither(image_all, text_all, "image_all and text_all")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"siglip_loss: image {tuple(image_features.shape)} and text "
            f"{tuple(text_features.shape)} features differ in shape"
        )
    _global_view(image_features, image_all, offset, "siglip_loss")
    texts_all, offset = _global_view(text_features, text_all, offset, "siglip_loss")
    images = F.normalize(image_features, dim=1)  # (B, D)
    logits = logit_scale * images @ F.normalize(texts_all, dim=1).T + logit_bias  # (B, N)
    batch = images.shape[0]
    rows = torch.arange(batch, device=logits.device)
    labels = torch.full_like(logits, -1.0)  # (B, N): -1 everywhere but the matching pair
    labels[rows, offset + rows] = 1.0
    return -F.logsigmoid(labels * logits).sum() / batch


@torch.no_grad()
def retrieval_stats(
    a: torch.Tensor, b: torch.Tensor, b_all: torch.Tensor | None = None, offset: int = 0
) -> dict[str, torch.Tensor]:
    """How well local queries a (B, D) find their positives b (B, D) among b_all (N, D).

    Returns 0-dim tensors on the input device (no host sync): pos_sim, the mean cosine of
    matching pairs; neg_sim, the mean cosine of the B*(N-1) non-matching pairs; top1, the
    fraction of queries whose most similar candidate is their own positive.
    """
    if a.shape != b.shape:
        raise ValueError(f"retrieval_stats: a {tuple(a.shape)} and b {tuple(b.shape)} differ")
    candidates, offset = _global_view(b, b_all, offset, "retrieval_stats")
    batch, total = a.shape[0], candidates.shape[0]
    cosine = F.normalize(a, dim=1) @ F.normalize(candidates, dim=1).T  # (B, N)
    positive_column = offset + torch.arange(batch, device=a.device)  # (B,)
    positive = cosine[torch.arange(batch, device=a.device), positive_column]  # (B,)
    return {
        "pos_sim": positive.mean(),
        # NaN when there is no negative at all (a single candidate).
        "neg_sim": (cosine.sum() - positive.sum()) / (batch * (total - 1)),
        "top1": (cosine.argmax(dim=1) == positive_column).float().mean(),
    }
