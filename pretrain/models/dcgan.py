"""DCGAN-style convolutional networks (Radford et al., 2016) for 8-256 px images, 32-64 px in use.

DCGANEncoder: strided 4x4 convolutions (each halves the size), BatchNorm after every one but the
first, LeakyReLU(0.2). It is the autoencoder / VAE encoder and the GAN discriminator's trunk, and
is registered with timm as `dcgan_encoder`: once this module is imported,
`timm.create_model("dcgan_encoder", num_classes=0, width=64, depth=3)` rebuilds an export.

DCGANGenerator: a latent vector -> 4x4 map -> transposed 4x4 convolutions doubling the size ->
tanh pixels in [0, 1] -> normalized with the data's mean/std (the space the encoder sees). It is
the GAN generator and the autoencoder / VAE decoder.

Both use the DCGAN initialisation: convolution weights N(0, 0.02), BatchNorm scales N(1, 0.02).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.models.encoder import ModelError

NORMS = ("batch", "none")


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN initialisation, in place, for every convolution and BatchNorm inside `module`."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)


class DCGANEncoder(nn.Module):
    """x [B, 3, H, W] -> forward_features [B, width * 2^(depth-1), H / 2^depth, W / 2^depth]
    -> forward_head: global pool (+ classifier when num_classes > 0) -> [B, num_features]."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        width: int = 64,
        depth: int = 3,
        norm: str = "batch",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"dcgan_encoder norm must be one of {NORMS}, got {norm!r}")
        if depth < 1 or width < 1:
            raise ValueError(
                f"dcgan_encoder needs depth >= 1 and width >= 1 (got {depth}, {width})"
            )
        self.num_classes = num_classes
        stages, channels = [], in_chans
        for index in range(depth):
            out_channels = width * 2**index
            # DCGAN: no normalisation on the layer that sees pixels.
            normalized = norm == "batch" and index > 0
            stages.append(
                nn.Sequential(
                    nn.Conv2d(channels, out_channels, 4, stride=2, padding=1, bias=not normalized),
                    nn.BatchNorm2d(out_channels) if normalized else nn.Identity(),
                    nn.LeakyReLU(0.2, inplace=True),
                )
            )
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = channels
        self.head = ClassifierHead(
            channels, num_classes, pool_type=global_pool, drop_rate=drop_rate
        )
        dcgan_init_(self.stages)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)  # [B, C, H / 2^depth, W / 2^depth]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)  # [B, C] or [B, num_classes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)


default_cfgs = generate_default_cfgs(
    {
        "dcgan_encoder": {
            "url": "",
            "num_classes": 1000,
            "input_size": (3, 32, 32),
            "pool_size": (4, 4),
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "first_conv": "stages.0.0",
            "classifier": "head.fc",
        }
    }
)


@register_model
def dcgan_encoder(pretrained: bool = False, **kwargs) -> DCGANEncoder:
    """DCGAN discriminator trunk: `width` channels after the first conv, x2 per later conv."""
    return build_model_with_cfg(DCGANEncoder, "dcgan_encoder", pretrained, **kwargs)


class DCGANGenerator(nn.Module):
    """z [B, latent_dim] -> images [B, 3, image_size, image_size], normalized with mean/std.

    Channels: width * 2^(n-1) at 4x4, halved at each of the n = log2(image_size / 4) doublings,
    the last of which maps to RGB.
    """

    def __init__(
        self,
        latent_dim: int,
        image_size: int,
        width: int = 64,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        doublings = math.log2(image_size / 4) if image_size >= 8 else 0
        if not doublings or doublings != int(doublings) or image_size > 256:
            raise ModelError(
                f"the DCGAN generator needs data.image_size a power of two in 8..256, "
                f"got {image_size}"
            )
        doublings = int(doublings)
        channels = width * 2 ** (doublings - 1)
        layers = [
            nn.ConvTranspose2d(latent_dim, channels, 4, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        ]  # [B, channels, 4, 4]
        for _ in range(doublings - 1):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels // 2),
                nn.ReLU(inplace=True),
            ]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, 3, 4, stride=2, padding=1), nn.Tanh()]
        self.layers = nn.Sequential(*layers)
        self.latent_dim = latent_dim
        # Fixed, not state: rebuilt from the arguments, so kept out of the state dict.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        dcgan_init_(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        signed = self.layers(z[:, :, None, None])  # [B, 3, S, S] in [-1, 1]
        pixels = (signed + 1) / 2
        return (pixels - self.mean) / self.std
