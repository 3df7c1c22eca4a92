"""DCGAN (Radford et al., 2016): a generator from noise against a discriminator whose trunk is the
encoder we keep. As in the DCGAN protocol, the discriminator's features are what gets evaluated.

Two optimizer phases per step through the engine's `optimizer_phases` hook, in this order:

    discriminator: loss = -log D(x) - log(1 - D(G(z)))      G(z) computed without gradient
    generator:     loss = -log D(G(z))                      non-saturating (the default), or
                   loss =  log(1 - D(G(z)))                 minimax (gan.generator_loss)

with D = sigmoid(logit) and logit = linear(flattened encoder feature map); the losses are
computed from logits. Shapes: B batch, Z noise size (gan.noise_dim), S image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.errors import ConfigError
from pretrain.models.dcgan import DCGANGenerator  # also registers `dcgan_encoder` with timm
from pretrain.models.encoder import encoder_from_config
from pretrain.models.feature_head import FeatureMapLinear
from pretrain.objectives.autoencoder import generative_train_transform
from pretrain.objectives.registry import register_objective

if TYPE_CHECKING:
    from pretrain.config import Config

PHASES = ("discriminator", "generator")


@dataclass
class GANConfig:
    noise_dim: int = 100
    generator_width: int = 64  # channels before the RGB layer, x2 per stage toward 4x4
    # non_saturating: -log D(G(z)); minimax: the original log(1 - D(G(z)))
    generator_loss: Literal["non_saturating", "minimax"] = "non_saturating"
    sample_grid: int = 8  # fixed-noise samples drawn as a sample_grid x sample_grid picture


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), batch means; logits [B] each.

    From logits, stably: -log sigmoid(l) = softplus(-l), -log(1 - sigmoid(l)) = softplus(l).
    """
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """non_saturating: -log D(G(z)); minimax: log(1 - D(G(z))); batch means; logits [B]."""
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    return -F.softplus(fake_logits).mean()


def mean_pairwise_distance(images: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance over all pairs of a batch: [B, ...] -> scalar."""
    return torch.pdist(images.flatten(1).float()).mean()


class GAN(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        image_size: int,
        noise_dim: int,
        generator_width: int,
        generator_loss: str,
        sample_grid: int,
    ):
        super().__init__()
        self.encoder = encoder  # discriminator trunk: the exported part
        self.discriminator_head = FeatureMapLinear(encoder, image_size, 1)
        self.generator = DCGANGenerator(noise_dim, image_size, generator_width)
        self.noise_dim = noise_dim
        self.generator_loss_kind = generator_loss
        self.sample_grid = sample_grid
        # A buffer, so it is in every checkpoint: a resumed run keeps drawing the same grid.
        self.register_buffer("fixed_noise", torch.randn(sample_grid**2, noise_dim))

    def optimizer_phases(self) -> dict[str, list[nn.Parameter]]:
        discriminator = [*self.encoder.parameters(), *self.discriminator_head.parameters()]
        return {"discriminator": discriminator, "generator": list(self.generator.parameters())}

    def discriminate(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.discriminator_head(self.encoder.forward_features(images))  # [B, 1]
        return logits.squeeze(1).float()  # fp32 for the losses under bf16 autocast

    def generate(self, count: int, device: torch.device) -> torch.Tensor:
        return self.generator(torch.randn(count, self.noise_dim, device=device))  # [B, 3, S, S]

    def forward(self, batch: dict, phase: str | None = None) -> dict:
        real = batch["image"]  # [B, 3, S, S], normalized
        if phase == "discriminator":
            return self._discriminator_step(real)
        if phase == "generator":
            return self._generator_step(real)
        raise ValueError(f"GAN.forward needs phase in {PHASES} (the engine's optimizer_phases)")

    def _discriminator_step(self, real: torch.Tensor) -> dict:
        with torch.no_grad():  # the generator is not trained in this phase
            fake = self.generate(real.shape[0], real.device)
        real_logits, fake_logits = self.discriminate(real), self.discriminate(fake)  # [B] each
        loss = discriminator_loss(real_logits, fake_logits)
        # Mode-collapse indicator: spread of the generated batch relative to the real one;
        # near 0 when the generator maps all noise to a few images, about 1 when healthy.
        diversity = mean_pairwise_distance(fake) / mean_pairwise_distance(real).clamp_min(1e-8)
        return {
            "loss": loss,
            "d_real": torch.sigmoid(real_logits).mean().detach(),  # D(x)
            "d_fake": torch.sigmoid(fake_logits).mean().detach(),  # D(G(z)) before D's step
            "sample_diversity": diversity,
        }

    def _generator_step(self, real: torch.Tensor) -> dict:
        fake_logits = self.discriminate(self.generate(real.shape[0], real.device))  # [B]
        loss = generator_loss(fake_logits, self.generator_loss_kind)
        # D(G(z)) after D's step: what the generator sees.
        return {"loss": loss, "d_fake_after_d_step": torch.sigmoid(fake_logits).mean().detach()}

    @torch.no_grad()
    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"samples": [g, g, 3, S, S]}: the generator's images for the fixed noise."""
        grid = self.sample_grid
        return {"samples": self.generator(self.fixed_noise).unflatten(0, (grid, grid))}


@register_objective("gan", train_transform=generative_train_transform, section=GANConfig)
def build_gan(config: Config):
    settings = config.gan
    if settings.noise_dim < 1 or settings.sample_grid < 1:
        raise ConfigError("gan.noise_dim and gan.sample_grid must be >= 1")
    encoder, spec = encoder_from_config(config)
    model = GAN(
        encoder,
        config.data.image_size,
        settings.noise_dim,
        settings.generator_width,
        settings.generator_loss,
        settings.sample_grid,
    )
    return model, spec
