"""The lightweight MAE decoder: visible tokens + mask tokens -> pixels of every patch."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from pretrain.models.position import sincos_2d


class MAEDecoder(nn.Module):
    def __init__(
        self,
        encoder_dim: int,
        grid_size: tuple[int, int],
        patch_size: int,
        num_prefix_tokens: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        in_chans: int = 3,
    ):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed (not learned) sin-cos positions; prefix tokens (cls/registers) get zeros.
        positions = sincos_2d(dim, *grid_size)
        prefix = torch.zeros(num_prefix_tokens, dim)
        self.register_buffer("pos_embed", torch.cat([prefix, positions])[None], persistent=False)
        self.blocks = nn.Sequential(
            *[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.predict = nn.Linear(dim, patch_size * patch_size * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: [N, P + L_keep, E] (prefix tokens first); ids_restore: [N, L].

        Returns per-patch pixel predictions [N, L, patch_size**2 * C] in the original patch order.
        """
        x = self.embed(latent)  # [N, P + L_keep, D]
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        batch, num_patches = ids_restore.shape
        masks = self.mask_token.expand(batch, num_patches - visible.shape[1], -1)
        shuffled = torch.cat([visible, masks], dim=1)  # [N, L, D], keep-first order
        index = ids_restore.unsqueeze(-1).expand(-1, -1, shuffled.shape[-1])
        unshuffled = torch.gather(shuffled, 1, index)  # [N, L, D], image order
        x = torch.cat([prefix, unshuffled], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.predict(x[:, self.num_prefix_tokens :])
