"""Masked language modelling (BERT; Devlin et al., 2019) on captions: the text half of masked
autoencoding, and a warm start for CLIP's text tower (`clip.text_init`).

The encoder is the text transformer CLIP uses (open_clip's TextTransformer, CLIP's BPE) without
the causal mask, so every token sees both sides; keys at padding are masked out. The loader
corrupts each caption with BERT's rule (pretrain.data.transforms.bert_mask: 15% of the
non-special tokens chosen; of those 80% -> the mask token, 10% -> a random token, 10% kept), and
the model predicts the chosen tokens through a head tied to the token embedding. The mask token
is one extra embedding row (id 49408, pretrain.models.text).

Shapes: B captions on this process, T context length, W width, V = 49408 BPE ids (what can be
predicted; the mask token never is), M chosen positions on this process.

Distribution: the loss is the mean cross-entropy over the chosen positions of the GLOBAL batch.
Each process returns (its summed cross-entropy) x W_processes / (chosen positions of all
processes); DDP's gradient average then gives exactly the one-process gradient, however the
chosen positions fall across processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.checkpoint import export_text_encoder
from pretrain.data.transforms import IGNORE_INDEX, MaskedCaption
from pretrain.distributed import sum_over_processes, world_info
from pretrain.errors import ConfigError
from pretrain.models.text import CaptionTokenizer, bidirectional_text_spec
from pretrain.objectives.registry import register_objective

if TYPE_CHECKING:
    from pretrain.config import Config


@dataclass
class MLMConfig:
    # The text encoder: open_clip's TextTransformer with CLIP's BPE, bidirectional. To warm-start
    # CLIP from it, these equal clip.context_length, text_width, text_layers, text_heads.
    context_length: int = 32
    width: int = 256
    layers: int = 4
    heads: int = 4
    # BERT's masking: each non-special token is chosen with this probability; a chosen token is
    # replaced by the mask token, or by a random token, with these probabilities, else kept.
    mask_probability: float = 0.15
    replace_with_mask: float = 0.8
    replace_with_random: float = 0.1


class MaskedTokenHead(nn.Module):
    """BERT's prediction head, tied to the token embedding: Linear + GELU + LayerNorm, then
    scores against the embedding rows of the V predictable ids, plus a bias per id.
    hidden [M, W], token_embedding [V + 1, W] -> logits [M, V]. No output matrix of its own."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        return self.transform(hidden) @ token_embedding[: self.vocab_size].T + self.bias


def masked_token_sums(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [M, V], targets [M] -> (summed cross-entropy, number of top-1 hits), scalars."""
    summed = F.cross_entropy(logits, targets, reduction="sum")
    hits = (logits.detach().argmax(dim=-1) == targets).sum()
    return summed, hits


class MaskedLanguageModel(nn.Module):
    def __init__(self, settings: MLMConfig):
        super().__init__()
        self.tokenizer = CaptionTokenizer(settings.context_length)
        self.spec = bidirectional_text_spec(
            self.tokenizer, settings.width, settings.layers, settings.heads
        )
        self.encoder = self.spec.create()  # the exported part: ids [B, T] -> [B, T, W]
        self.head = MaskedTokenHead(settings.width, self.tokenizer.vocab_size)

    def predict(self, inputs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """inputs [B, T] corrupted ids, chosen [B, T] bool -> logits [M, V] at the chosen
        positions, in row-major order (only those go through the head: V is large)."""
        hidden = self.encoder(inputs)  # [B, T, W]
        return self.head(hidden[chosen], self.encoder.token_embedding.weight)

    def forward(self, batch: dict) -> dict:
        targets = batch["text_targets"]  # [B, T], IGNORE_INDEX where nothing is predicted
        chosen = targets != IGNORE_INDEX
        logits = self.predict(batch["text"], chosen)  # [M, V]
        wanted = targets[chosen]  # [M]
        summed, hits = masked_token_sums(logits, wanted)
        local = torch.stack(
            [summed.detach(), hits.to(summed.dtype), summed.new_tensor(len(wanted))]
        )
        total_loss, total_hits, total_chosen = sum_over_processes(local)  # over the global batch
        chosen_count = total_chosen.clamp(min=1)
        _, world_size = world_info()
        mean_loss = total_loss / chosen_count
        return {
            "loss": summed * world_size / chosen_count,  # DDP averages: the global mean's gradient
            "top1": total_hits / chosen_count,  # masked-token accuracy
            "perplexity": mean_loss.exp(),
        }

    def export(self, run_dir: Path, meta: dict, encoder_state: dict) -> Path:
        """export/text_encoder.safetensors + text_encoder.json (how to rebuild it, tokenizer)."""
        card = {**self.spec.card(), **{key: meta[key] for key in ("objective", "steps", "run_dir")}}
        weights, _ = export_text_encoder(run_dir, encoder_state, card)
        return weights


def masking_settings(settings: MLMConfig) -> dict:
    """bert_mask's keyword arguments from the config section."""
    return {
        "choose": settings.mask_probability,
        "to_mask": settings.replace_with_mask,
        "to_random": settings.replace_with_random,
    }


def mlm_train_transform(config: Config) -> MaskedCaption:
    settings = config.mlm
    return MaskedCaption(CaptionTokenizer(settings.context_length), masking_settings(settings))


def _check(settings: MLMConfig) -> None:
    fractions = (
        settings.mask_probability,
        settings.replace_with_mask,
        settings.replace_with_random,
    )
    if not all(0 <= value <= 1 for value in fractions) or settings.mask_probability == 0:
        raise ConfigError("mlm.mask_probability must be in (0, 1], mlm.replace_with_* in [0, 1]")
    if settings.replace_with_mask + settings.replace_with_random > 1:
        raise ConfigError("mlm.replace_with_mask + mlm.replace_with_random must not exceed 1")
    if settings.width % settings.heads:
        raise ConfigError(
            f"mlm.width {settings.width} is not divisible by mlm.heads {settings.heads}"
        )
    if settings.context_length < 3:
        raise ConfigError("mlm.context_length must hold a start, a token and an end: at least 3")


@register_objective("mlm", train_transform=mlm_train_transform, section=MLMConfig)
def build_mlm(config: Config):
    _check(config.mlm)
    model = MaskedLanguageModel(config.mlm)
    return model, model.spec
