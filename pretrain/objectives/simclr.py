"""SimCLR (Chen et al., 2020): two augmentations of each image, pulled together against the
rest of the GLOBAL batch with the NT-Xent loss.

Shapes: B images on this process, N = B * processes in the global batch, F encoder features,
D projection width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn

from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD, SimCLRViews
from pretrain.data.view_params import blur_probability, jitter_groups
from pretrain.distributed import gather_global_batch
from pretrain.errors import ConfigError
from pretrain.losses import nt_xent, retrieval_stats
from pretrain.models.color_augment import augment_views, blur_kernel_size
from pretrain.models.encoder import encoder_from_config
from pretrain.models.projection import ProjectionHead
from pretrain.objectives.registry import register_objective

if TYPE_CHECKING:
    from pretrain.config import Config


@dataclass
class SimCLRConfig:
    temperature: float = 0.2
    # Projection MLP: (layers - 1) x [Linear, BatchNorm, ReLU], then Linear without bias or ReLU.
    projection_layers: int = 2
    projection_hidden_dim: int = 512
    projection_dim: int = 128
    # global: the whole global batch (gathered); local: this process's batch only
    negatives: Literal["global", "local"] = "global"
    # Augmentation (SimCLR appendix A): crop, flip, colour jitter, grayscale, blur.
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # b, c, s, hue
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    # None: 0.5 for images above 32 px, 0 at 32 px and below (the paper's CIFAR recipe)
    blur_p: float | None = None
    blur_kernel_fraction: float = 0.1  # Gaussian kernel side ~10% of the image, sigma 0.1-2


class SimCLR(nn.Module):
    """Views arrive from the loader as normalized crops with their colour parameters
    (SimCLRViews); the colour jitter, grayscale and blur run here, batched on the device. Views
    without parameters (already augmented) go to the encoder as they are."""

    def __init__(self, encoder: nn.Module, settings: SimCLRConfig, image_size: int):
        super().__init__()
        if settings.temperature <= 0:
            raise ConfigError(f"simclr.temperature must be positive, got {settings.temperature}")
        self.encoder = encoder
        self.projection = ProjectionHead(
            encoder.num_features,
            settings.projection_hidden_dim,
            settings.projection_dim,
            settings.projection_layers,
        )
        self.temperature = settings.temperature
        self.global_negatives = settings.negatives == "global"
        blurs = blur_probability(image_size, settings.blur_p) > 0
        self.blur_kernel = (
            blur_kernel_size(image_size, settings.blur_kernel_fraction) if blurs else 0
        )
        # not in checkpoints (persistent=False): constants, not state
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD), persistent=False)

    @torch.compiler.disable  # data-dependent row selection; ints from the host as inputs
    def views(self, batch: dict) -> torch.Tensor:
        """Both views stacked, (2B, 3, H, W), colour-augmented when the batch carries parameters."""
        views = torch.cat([batch["image"], batch["image2"]])
        if "view_params" not in batch:  # already augmented
            return views
        params = torch.cat([batch["view_params"], batch["view_params2"]])  # (2B, P)
        if "view_jitter_rows" in batch:  # the loader's worker grouped the views by colour op
            groups = batch["view_jitter_rows"], batch["view_jitter_sizes"]
        else:  # a batch assembled without SimCLRViews.finish_batch: one read back to the host
            groups = jitter_groups(params.cpu())
        with torch.autocast(views.device.type, enabled=False):  # pixels in fp32, even blur
            return augment_views(
                views, params, self.pixel_mean, self.pixel_std, self.blur_kernel, groups
            )

    def forward(self, batch: dict, embed_only: bool = False) -> dict:
        """The loss and its statistics; with embed_only, the projections {"z1", "z2"} (B, D)
        that the loss is taken on (EmbeddingObjective: GradCache accumulation)."""
        views = self.views(batch)  # (2B, 3, H, W): one encoder pass
        z1, z2 = self.projection(self.encoder(views)).chunk(2)  # (B, D) each
        embeddings = {"z1": z1, "z2": z2}
        return embeddings if embed_only else self.embedding_loss(embeddings)

    def embedding_loss(self, embeddings: dict) -> dict:
        """NT-Xent of {"z1", "z2"} (B, D) against the global batch's (gathered here)."""
        z1, z2 = embeddings["z1"], embeddings["z2"]
        if self.global_negatives:
            (z1_all, z2_all), offset = gather_global_batch(z1, z2)  # (N, D) each, rank order
        else:
            z1_all = z2_all = None
            offset = 0
        loss = nt_xent(z1, z2, self.temperature, z1_all, z2_all, offset)
        stats = retrieval_stats(z1, z2, z2_all, offset)  # view 1 -> view 2 among N candidates
        return {
            "loss": loss,
            "temperature": torch.tensor(self.temperature, device=loss.device),
            "pos_sim": stats["pos_sim"],
            "neg_sim": stats["neg_sim"],
            "top1": stats["top1"],
        }


def simclr_train_transform(config: Config) -> SimCLRViews:
    settings = config.simclr
    return SimCLRViews(
        config.data.image_size,
        crop_scale=settings.crop_scale,
        flip_p=settings.flip_p,
        color_jitter=settings.color_jitter,
        color_jitter_p=settings.color_jitter_p,
        grayscale_p=settings.grayscale_p,
        blur_p=settings.blur_p,
    )


@register_objective("simclr", train_transform=simclr_train_transform, section=SimCLRConfig)
def build_simclr(config: Config):
    encoder, spec = encoder_from_config(config)
    return SimCLR(encoder, config.simclr, config.data.image_size), spec
