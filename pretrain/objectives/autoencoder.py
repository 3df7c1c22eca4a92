"""Autoencoder: encoder -> bottleneck vector -> DCGAN decoder, trained to reproduce its input (MSE).

Shapes: B batch, D latent size (autoencoder.latent_dim), S image size. The encoder is any timm
model (`model.name`; `dcgan_encoder` for the DCGAN-style conv net); the bottleneck reads its whole
feature map, so the decoder can know where things are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

from pretrain.config import Config
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from pretrain.models.dcgan import DCGANGenerator  # also registers `dcgan_encoder` with timm
from pretrain.models.encoder import encoder_from_config
from pretrain.models.feature_head import FeatureMapLinear


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


def build_autoencoder(config: Config):
    encoder, spec = encoder_from_config(config)
    settings = config.autoencoder
    model = Autoencoder(
        encoder, config.data.image_size, settings.latent_dim, settings.decoder_width
    )
    return model, spec


def generative_train_transform(config: Config) -> ImageTransform:
    """Resize and centre-crop to data.image_size, random horizontal flip, normalize.

    Reconstruction and generative objectives learn the image distribution itself, so they get
    no augmentation beyond a flip (which leaves that distribution unchanged for natural images).
    """
    size = config.data.image_size
    return ImageTransform(
        T.Compose(
            [
                T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(size),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
    )
