"""Variational autoencoder (Kingma & Welling, 2014) with a beta-weighted KL term (Higgins et al.).

    q(z|x) = N(mu, diag(sigma^2)), (mu, log sigma^2) = linear(flattened encoder feature map)
    z = mu + sigma * eps, eps ~ N(0, I)              (reparameterisation: gradients reach mu, sigma)
    loss = sum over pixels of (decoder(z) - x)^2     (per image, batch mean)
         + beta_t * KL(q(z|x) || N(0, I))            (closed form, nats per image, batch mean)

beta_t rises linearly from 0 to vae.beta over vae.kl_warmup_steps optimizer steps, so the decoder
learns to use the latent before the KL term pulls it toward the prior. The step count lives in a
buffer of the module, hence in every checkpoint: a resumed run continues the same warm-up.

Shapes: B batch, D latent size (vae.latent_dim), S image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from pretrain.errors import ConfigError
from pretrain.models.dcgan import DCGANGenerator  # also registers `dcgan_encoder` with timm
from pretrain.models.encoder import encoder_from_config
from pretrain.models.feature_head import FeatureMapLinear
from pretrain.objectives.autoencoder import generative_train_transform
from pretrain.objectives.registry import register_objective

if TYPE_CHECKING:
    from pretrain.config import Config


@dataclass
class VAEConfig:
    latent_dim: int = 128
    decoder_width: int = 64
    beta: float = 1.0  # loss = per-image sum of squared errors + beta * KL(q(z|x) || N(0, I))
    kl_warmup_steps: int = 1000  # optimizer steps over which beta rises linearly from 0
    sample_grid: int = 8  # prior samples drawn as a sample_grid x sample_grid picture
    traversal_dims: int = 8  # latent dimensions in the traversal picture (the most used ones)
    traversal_range: float = 3.0  # each is swept over [-range, range]


def twice_kl_terms(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """2 x KL(N(mu, exp(logvar)) || N(0, I)) per sample and dimension: [B, D] -> [B, D]."""
    return mu.pow(2) + logvar.exp() - 1.0 - logvar


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, summed over dimensions: [B, D] -> [B]."""
    return 0.5 * twice_kl_terms(mu, logvar).sum(dim=1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): a sample that is differentiable in mu and sigma."""
    return mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # [B, D]


class VAE(nn.Module):
    def __init__(
        self, encoder: nn.Module, image_size: int, settings: VAEConfig, micro_batches_per_step: int
    ):
        super().__init__()
        self.encoder = encoder
        self.latent_dim = settings.latent_dim
        self.to_moments = FeatureMapLinear(encoder, image_size, 2 * settings.latent_dim)
        self.decoder = DCGANGenerator(settings.latent_dim, image_size, settings.decoder_width)
        self.beta = settings.beta
        self.kl_warmup_steps = settings.kl_warmup_steps
        self.micro_batches_per_step = micro_batches_per_step
        self.traversal_dims = min(settings.traversal_dims, settings.latent_dim)
        self.traversal_range = settings.traversal_range
        self.sample_grid = settings.sample_grid
        # Training forward passes so far (micro-batches): drives the beta warm-up across resumes.
        self.register_buffer("training_forwards", torch.zeros((), dtype=torch.long))
        # The same prior draws at every picture step, so the grids show training progress.
        self.register_buffer("fixed_noise", torch.randn(settings.sample_grid**2, self.latent_dim))

    def current_beta(self) -> float:
        """beta_t: linear warm-up from 0 over kl_warmup_steps optimizer steps, then vae.beta."""
        if self.kl_warmup_steps <= 0:
            return self.beta
        steps = int(self.training_forwards) // self.micro_batches_per_step
        return self.beta * min(1.0, steps / self.kl_warmup_steps)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 moments: exp(logvar) and the KL sum lose too much in bf16 under autocast.
        moments = self.to_moments(self.encoder.forward_features(images)).float()  # [B, 2D]
        mu, logvar = moments.chunk(2, dim=1)  # [B, D] each
        return mu, logvar

    def forward(self, batch: dict) -> dict:
        beta = self.current_beta()
        if self.training:
            self.training_forwards += 1
        images = batch["image"]  # [B, 3, S, S], normalized
        mu, logvar = self.encode(images)
        reconstruction = self.decoder(reparameterize(mu, logvar))  # [B, 3, S, S]
        squared_error = (reconstruction - images).pow(2).flatten(1)  # [B, 3*S*S]
        reconstruction_term = squared_error.sum(dim=1).mean()
        kl = kl_to_standard_normal(mu, logvar).mean()
        return {
            "loss": reconstruction_term + beta * kl,
            "recon_mse": squared_error.mean().detach(),  # per pixel, comparable to the autoencoder
            "kl": kl.detach(),
            "beta": torch.tensor(beta, device=images.device),
        }

    # --- pictures -----------------------------------------------------------------------------

    @torch.no_grad()
    def visualize(self, batch: dict, count: int = 8) -> dict[str, torch.Tensor]:
        """Three pictures, in normalized image space:

        reconstruction [count, 2, 3, S, S]: rows of (input, decoder(mu));
        prior_samples [g, g, 3, S, S]: decoder(z), z the fixed N(0, I) draws;
        traversal [k, c, 3, S, S]: the first input's mu with one latent dimension per row set to
            c values across [-range, range], the others fixed; the k dimensions carrying the most
            KL on this batch (the ones the model uses), most first.
        """
        images = batch["image"]
        mu, logvar = self.encode(images)
        reconstruction = self.decoder(mu[:count])
        grid = self.sample_grid
        prior_samples = self.decoder(self.fixed_noise).unflatten(0, (grid, grid))

        kl_per_dim = 0.5 * twice_kl_terms(mu, logvar).mean(dim=0)  # [D]
        dims = kl_per_dim.argsort(descending=True)[: self.traversal_dims]  # [k]
        values = torch.linspace(-self.traversal_range, self.traversal_range, grid, device=mu.device)
        codes = mu[:1].repeat(len(dims), grid, 1)  # [k, c, D]
        codes[torch.arange(len(dims)), :, dims] = values  # row r: dimension dims[r] swept
        traversal = self.decoder(codes.flatten(0, 1)).unflatten(0, (len(dims), grid))
        return {
            "reconstruction": torch.stack([images[:count], reconstruction], dim=1),
            "prior_samples": prior_samples,
            "traversal": traversal,
        }


@register_objective("vae", train_transform=generative_train_transform, section=VAEConfig)
def build_vae(config: Config):
    settings = config.vae
    if settings.beta < 0 or settings.latent_dim < 1 or settings.sample_grid < 1:
        raise ConfigError("vae.beta must be >= 0, vae.latent_dim and vae.sample_grid >= 1")
    encoder, spec = encoder_from_config(config)
    model = VAE(encoder, config.data.image_size, settings, config.train.grad_accum)
    return model, spec
