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
from pretrain.models.text import CaptionTokenizer, build_text_tower, load_text_encoder
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
    # Warm start: an `mlm` run (directory, export folder or text_encoder.json) whose text encoder
    # has this tower's shape; its weights replace the random ones (docs/pretraining.md).
    text_init: str = ""
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
        if settings.text_init:
            load_text_encoder(self.text, settings.text_init)
        self.sigmoid = settings.loss == "siglip"
        # The learnable temperature lives in log space; CLIP starts at 1/0.07, SigLIP at 10.
        # Scalars are stored as (1,): FSDP shards no 0-dim parameter.
        initial_scale = 10.0 if self.sigmoid else 1.0 / settings.init_temperature
        self.log_logit_scale = nn.Parameter(torch.tensor([math.log(initial_scale)]))
        self.max_log_logit_scale = math.log(settings.max_logit_scale)
        self.logit_bias = (
            nn.Parameter(torch.tensor([settings.siglip_init_bias])) if self.sigmoid else None
        )
        self.global_negatives = settings.negatives == "global"
        self.register_load_state_dict_pre_hook(_scalars_as_one_element)

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
        return self.log_logit_scale.clamp(max=self.max_log_logit_scale).exp().squeeze(0)

    def forward(self, batch: dict, embed_only: bool = False) -> dict:
        """The loss and its statistics; with embed_only, what the loss is taken on
        (EmbeddingObjective: GradCache accumulation): {"image", "text"} (B, D) and the 0-dim
        "logit_scale" (and SigLIP's "logit_bias")."""
        embeddings = {
            "image": self.encode_image(batch["image"]),  # (B, D)
            "text": self.encode_text(batch["text"]),  # (B, D)
            "logit_scale": self.logit_scale(),
        }
        if self.sigmoid:
            embeddings["logit_bias"] = self.logit_bias.squeeze(0)  # 0-dim
        return embeddings if embed_only else self.embedding_loss(embeddings)

    def embedding_loss(self, embeddings: dict) -> dict:
        """The contrastive loss of the embeddings against the global batch's (gathered here)."""
        image, text, scale = embeddings["image"], embeddings["text"], embeddings["logit_scale"]
        if self.global_negatives:
            (image_all, text_all), offset = gather_global_batch(image, text)  # (N, D) each
        else:
            image_all = text_all = None
            offset = 0
        if self.sigmoid:
            bias = embeddings["logit_bias"]
            loss = siglip_loss(image, text, scale, bias, image_all, text_all, offset)
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


def _scalars_as_one_element(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the scalars became (1,) load as they are."""
    for name in ("log_logit_scale", "logit_bias"):
        value = state_dict.get(prefix + name)
        if value is not None and value.dim() == 0:
            state_dict[prefix + name] = value.reshape(1)


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
