"""Masked Autoencoder (He et al., 2022): encode visible patches only, reconstruct the masked ones.

Shapes: N batch, L patches, p patch size, E encoder width, P prefix tokens (cls/registers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from einops import rearrange
from timm.models import checkpoint_seq

from pretrain.data.transforms import ImageTransform, mae_train_transform
from pretrain.errors import ModelError
from pretrain.models.encoder import encoder_from_config
from pretrain.models.mae_decoder import MAEDecoder
from pretrain.models.position import sincos_2d
from pretrain.objectives.registry import register_objective

if TYPE_CHECKING:
    from pretrain.config import Config


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4


def patch_statistics(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std (eps 1e-6 under the root) of [N, L, D] patches: [N, L, 1] each,
    the units of norm_pix_loss targets."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    return mean, std


class MAE(nn.Module):
    def __init__(self, encoder: nn.Module, settings: MAEConfig):
        super().__init__()
        for part in ("patch_embed", "pos_embed", "blocks", "norm"):
            if getattr(encoder, part, None) is None:
                raise ModelError(f"MAE needs a ViT-style timm encoder; this one has no {part}")
        if getattr(encoder, "dynamic_img_size", False):
            raise ModelError("MAE needs fixed-size patch embeddings (dynamic_img_size=False)")
        self.encoder = encoder
        self.mask_ratio = settings.mask_ratio
        self.norm_pix_loss = settings.norm_pix_loss
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.grid_size = tuple(encoder.patch_embed.grid_size)
        self.num_prefix_tokens = encoder.num_prefix_tokens
        # Prefix tokens carry their own slot in pos_embed unless timm says otherwise.
        self.prefix_has_position = not getattr(encoder, "no_embed_class", False)
        self._fix_encoder_positions()
        self.decoder = MAEDecoder(
            encoder_dim=encoder.embed_dim,
            grid_size=self.grid_size,
            patch_size=self.patch_size,
            num_prefix_tokens=self.num_prefix_tokens,
            dim=settings.decoder_dim,
            depth=settings.decoder_depth,
            heads=settings.decoder_heads,
        )

    def _fix_encoder_positions(self) -> None:
        """Fixed sin-cos positions in the encoder's own pos_embed (exported with the weights)."""
        positions = sincos_2d(self.encoder.embed_dim, *self.grid_size)  # [L, E]
        if self.prefix_has_position:
            prefix = torch.zeros(self.num_prefix_tokens, positions.shape[1])
            positions = torch.cat([prefix, positions])
        with torch.no_grad():
            self.encoder.pos_embed.copy_(positions[None])
        self.encoder.pos_embed.requires_grad_(False)

    # --- masking -----------------------------------------------------------------------------

    def random_masking(self, tokens: torch.Tensor):
        """Per-sample random masking by argsort of uniform noise.

        tokens: [N, L, E] -> visible [N, L_keep, E], mask [N, L] (0 keep, 1 remove),
        ids_restore [N, L] (inverse permutation: keep-first order back to image order).
        """
        batch, length, width = tokens.shape
        keep = int(length * (1 - self.mask_ratio))
        noise = torch.rand(batch, length, device=tokens.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, width))
        mask = torch.ones(batch, length, device=tokens.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return visible, mask, ids_restore

    # --- encoder on visible patches only ------------------------------------------------------

    def encode_visible(self, images: torch.Tensor):
        """images [N, 3, H, W] -> latent [N, P + L_keep, E], mask [N, L], ids_restore [N, L]."""
        encoder = self.encoder
        tokens = encoder.patch_embed(images)  # [N, L, E]
        patch_positions = (
            encoder.pos_embed[:, self.num_prefix_tokens :]
            if (self.prefix_has_position)
            else encoder.pos_embed
        )
        tokens = tokens + patch_positions  # positions before masking: each token keeps its own
        visible, mask, ids_restore = self.random_masking(tokens)
        prefix = self._prefix_tokens(images.shape[0])  # added after masking, never masked
        if prefix is not None:
            visible = torch.cat([prefix, visible], dim=1)
        x = encoder.norm_pre(visible)
        if getattr(encoder, "grad_checkpointing", False) and torch.is_grad_enabled():
            x = checkpoint_seq(encoder.blocks, x)  # recompute block activations in backward
        else:
            x = encoder.blocks(x)
        return encoder.norm(x), mask, ids_restore

    def _prefix_tokens(self, batch: int) -> torch.Tensor | None:
        encoder = self.encoder
        parts = []
        if getattr(encoder, "cls_token", None) is not None:
            parts.append(encoder.cls_token)
        if getattr(encoder, "reg_token", None) is not None:
            parts.append(encoder.reg_token)
        if not parts:
            return None
        prefix = torch.cat(parts, dim=1)  # [1, P, E]
        if self.prefix_has_position:
            prefix = prefix + encoder.pos_embed[:, : self.num_prefix_tokens]
        return prefix.expand(batch, -1, -1)

    # --- loss ---------------------------------------------------------------------------------

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], patches in row-major order like the patch embedding."""
        p = self.patch_size
        return rearrange(images, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        p, (h, w) = self.patch_size, self.grid_size
        return rearrange(patches, "n (h w) (p q c) -> n c (h p) (w q)", h=h, w=w, p=p, q=p)

    def reconstruction_loss(
        self, images: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared error over masked patches only; prediction [N, L, p*p*C], mask [N, L]."""
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean, std = patch_statistics(target)
            target = (target - mean) / std
        per_patch = ((prediction - target) ** 2).mean(dim=-1)  # [N, L]
        return (per_patch * mask).sum() / mask.sum()

    def no_weight_decay(self) -> set[str]:
        return {"decoder.mask_token"}

    def forward(self, batch: dict) -> dict:
        images = batch["image"]
        latent, mask, ids_restore = self.encode_visible(images)
        prediction = self.decoder(latent, ids_restore)  # [N, L, p*p*C]
        return {"loss": self.reconstruction_loss(images, prediction, mask)}

    # --- pictures -----------------------------------------------------------------------------

    @torch.no_grad()
    def visualize(self, batch: dict, count: int = 8) -> dict[str, torch.Tensor]:
        """Rows of (original, masked input, reconstruction with visible patches pasted back).

        Returns {"reconstruction": [count, 3, C, H, W]} (rows x columns of images) in normalized
        image space; the engine undoes the normalization when it writes the grid.
        """
        images = batch["image"][:count]
        latent, mask, ids_restore = self.encode_visible(images)
        prediction = self.decoder(latent, ids_restore)
        if self.norm_pix_loss:  # predictions are in per-patch normalized units: undo with targets
            mean, std = patch_statistics(self.patchify(images))
            prediction = prediction * std + mean
        patch_mask = mask.unsqueeze(-1)  # [N, L, 1]
        masked_input = self.unpatchify(self.patchify(images) * (1 - patch_mask))
        pasted = self.unpatchify(self.patchify(images) * (1 - patch_mask) + prediction * patch_mask)
        return {"reconstruction": torch.stack([images, masked_input, pasted], dim=1)}


def mae_transform(config: Config) -> ImageTransform:
    return mae_train_transform(config.data.image_size)


@register_objective("mae", train_transform=mae_transform, section=MAEConfig)
def build_mae(config: Config):
    encoder, spec = encoder_from_config(config)
    return MAE(encoder, config.mae), spec
