"""CLIP (Radford et al., 2021): an image tower and a text tower trained so that each image's
embedding is closest to its own caption's among all captions of the GLOBAL batch; SigLIP's
pairwise sigmoid loss (Zhai et al., 2023) as an option.

Shapes: B pairs on this process, N = B * processes, T context length, D shared embedding width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.data.transforms import ImageText, clip_image_transform
from pretrain.distributed import gather_global_batch
from pretrain.losses import clip_loss, retrieval_stats, siglip_loss
from pretrain.models.encoder import encoder_from_config
from pretrain.models.text import CaptionTokenizer, build_text_tower
from pretrain.objectives.registry import register_objective

if TYPE_CHECKING:
    from pretrain.config import Config


@dataclass
class CLIPConfig:
    embed_dim: int = 256  # shared image-text embedding width
    loss: Literal["clip", "siglip"] = "clip"  # clip: symmetric InfoNCE; siglip: pairwise sigmoid
    negatives: Literal["global", "local"] = "global"  # local: this process's batch only
    init_temperature: float = 0.07  # logit scale starts at ln(1/T); SigLIP starts at ln(10)
    max_logit_scale: float = 100.0  # the scale is clamped to ln(100) as in CLIP
    siglip_init_bias: float = -10.0
    # Text tower: open_clip's TextTransformer with the CLIP BPE tokenizer (bundled, offline).
    context_length: int = 32
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    crop_scale: tuple[float, float] = (0.9, 1.0)  # light crops: the caption describes the image


class CLIP(nn.Module):
    def __init__(self, encoder: nn.Module, settings: CLIPConfig):
        super().__init__()
        self.encoder = encoder  # the image trunk: what gets exported
        self.image_projection = nn.Linear(encoder.num_features, settings.embed_dim, bias=False)
        self.tokenizer = CaptionTokenizer(settings.context_length)
        self.text = build_text_tower(
            self.tokenizer,
            settings.text_width,
            settings.text_layers,
            settings.text_heads,
            settings.embed_dim,
        )
        self.sigmoid = settings.loss == "siglip"
        # The learnable temperature lives in log space; CLIP starts at 1/0.07, SigLIP at 10.
        initial_scale = 10.0 if self.sigmoid else 1.0 / settings.init_temperature
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(initial_scale)))
        self.max_log_logit_scale = math.log(settings.max_logit_scale)
        self.logit_bias = (
            nn.Parameter(torch.tensor(settings.siglip_init_bias)) if self.sigmoid else None
        )
        self.global_negatives = settings.negatives == "global"

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """list[str] -> (len, T) token ids."""
        return self.tokenizer(texts)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D), unit length."""
        return F.normalize(self.image_projection(self.encoder(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, D), unit length."""
        return F.normalize(self.text(tokens), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        """exp of the learnable log scale, clamped at ln(max) (gradient stops past the clamp)."""
        return self.log_logit_scale.clamp(max=self.max_log_logit_scale).exp()

    def forward(self, batch: dict) -> dict:
        image = self.encode_image(batch["image"])  # (B, D)
        text = self.encode_text(batch["text"])  # (B, D)
        if self.global_negatives:
            (image_all, text_all), offset = gather_global_batch(image, text)  # (N, D) each
        else:
            image_all = text_all = None
            offset = 0
        scale = self.logit_scale()
        if self.sigmoid:
            loss = siglip_loss(image, text, scale, self.logit_bias, image_all, text_all, offset)
        else:
            loss = clip_loss(image, text, scale, image_all, text_all, offset)
        image_to_text = retrieval_stats(image, text, text_all, offset)
        text_to_image = retrieval_stats(text, image, image_all, offset)
        return {
            "loss": loss,
            "logit_scale": scale.detach(),
            "pos_sim": image_to_text["pos_sim"],
            "neg_sim": image_to_text["neg_sim"],
            "top1_image_to_text": image_to_text["top1"],
            "top1_text_to_image": text_to_image["top1"],
        }


def clip_train_transform(config: Config) -> ImageText:
    return ImageText(
        clip_image_transform(config.data.image_size, crop_scale=config.clip.crop_scale),
        CaptionTokenizer(config.clip.context_length),
    )


@register_objective(
    "clip", train_transform=clip_train_transform, section=CLIPConfig, needs=("txt",)
)
def build_clip(config: Config):
    encoder, spec = encoder_from_config(config)
    return CLIP(encoder, config.clip), spec
