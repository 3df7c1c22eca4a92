"""A linear map from an encoder's whole feature map (not its pooled vector) to a few outputs.

The autoencoder's bottleneck, the VAE's (mu, log-variance) and the GAN discriminator's logit read
the flattened `forward_features` output, as DCGAN's last 4x4 convolution does: global pooling
would discard where things are, which a decoder needs and a discriminator uses. Works for any
timm encoder: [B, C, h, w] maps and [B, N, C] token sequences alike.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def feature_map_numel(encoder: nn.Module, image_size: int) -> int:
    """Values per sample in encoder.forward_features for image_size inputs (one dry run)."""
    was_training = encoder.training
    encoder.eval()  # no BatchNorm statistics updated by the dry run
    with torch.no_grad():
        probe = torch.zeros(1, 3, image_size, image_size)
        numel = encoder.forward_features(probe)[0].numel()
    encoder.train(was_training)
    return numel


class FeatureMapLinear(nn.Module):
    """feature map [B, ...] -> flatten [B, numel] -> linear -> [B, out_features]."""

    def __init__(self, encoder: nn.Module, image_size: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(feature_map_numel(encoder, image_size), out_features)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.linear(feature_map.flatten(1))
