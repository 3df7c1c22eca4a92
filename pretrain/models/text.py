"""The CLIP text tower and tokenizer, from open_clip (its BPE vocabulary ships with the package,
so both work offline)."""

from __future__ import annotations

import torch
import torch.nn as nn
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer


class CaptionTokenizer:
    """list[str] -> token ids (B, context_length) int64: CLIP's BPE with start/end tokens,
    zero padded, truncated at the context length. Picklable, for DataLoader workers."""

    def __init__(self, context_length: int):
        self.context_length = context_length
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self.tokenizer.encoder)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), context_length=self.context_length)


def build_text_tower(
    tokenizer: CaptionTokenizer, width: int, layers: int, heads: int, output_dim: int
) -> nn.Module:
    """A causal text transformer (B, T) ids -> (B, output_dim), pooled at the end-of-text token
    (the largest id in each row, as in CLIP)."""
    return TextTransformer(
        context_length=tokenizer.context_length,
        vocab_size=tokenizer.vocab_size,
        width=width,
        heads=heads,
        layers=layers,
        output_dim=output_dim,
        pool_type="argmax",
    )
