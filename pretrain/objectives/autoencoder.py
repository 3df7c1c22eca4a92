"""Autoencoder: encoder -> bottleneck vector -> DCGAN decoder, trained to reproduce its input (MSE).

Shapes: B batch, D latent size (autoencoder.latent_dim), S image size. The encoder is any timm
model (`model.name`; `dcgan_encoder` for the DCGAN-style conv net); the bottleneck reads its whole
feature map, so the decoder can know where things are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.data.transforms import ImageTransform, generative_transform
from pretrain.models.dcgan import DCGANGenerator  # also registers `dcgan_encoder` with timm
from pretrain.models.encoder import encoder_from_config
from pretrain.models.feature_head import FeatureMapLinear
from pretrain.objectives.registry import register_objective

if TYPE_CHECKING:
    from pretrain.config import Config


@dataclass
class AutoencoderConfig:
    latent_dim: int = 128  # bottleneck width: a linear map from the flattened encoder feature map
    decoder_width: int = 64  # DCGAN decoder: channels before the RGB layer, x2 per stage toward 4x4


class Autoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, image_size: int, latent_dim: int, decoder_width: int):
        super().__init__()
        self.encoder = encoder
        self.bottleneck = FeatureMapLinear(encoder, image_size, latent_dim)
        self.decoder = DCGANGenerator(latent_dim, image_size, decoder_width)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.encoder.forward_features(images))  # [B, D]

    def forward(self, batch: dict) -> dict:
        images = batch["image"]  # [B, 3, S, S], normalized
        reconstruction = self.decoder(self.encode(images))  # [B, 3, S, S], normalized
        return {"loss": F.mse_loss(reconstruction, images)}

    @torch.no_grad()
    def visualize(self, batch: dict, count: int = 8) -> dict[str, torch.Tensor]:
        """{"reconstruction": [count, 2, 3, S, S]}: rows of (input, reconstruction)."""
        images = batch["image"][:count]
        return {"reconstruction": torch.stack([images, self.decoder(self.encode(images))], dim=1)}


def generative_train_transform(config: Config) -> ImageTransform:
    """The autoencoder's, the VAE's and the GAN's: pretrain.data.transforms.generative_transform
    (resize, centre crop, flip) at data.image_size."""
    return generative_transform(config.data.image_size)


@register_objective(
    "autoencoder", train_transform=generative_train_transform, section=AutoencoderConfig
)
def build_autoencoder(config: Config):
    encoder, spec = encoder_from_config(config)
    settings = config.autoencoder
    model = Autoencoder(
        encoder, config.data.image_size, settings.latent_dim, settings.decoder_width
    )
    return model, spec
