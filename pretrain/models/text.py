"""The text tower and tokenizer, from open_clip (its BPE vocabulary ships with the package, so both
work offline): CLIP's causal tower, the bidirectional text encoder that masked language
modelling (`mlm`) trains, its export card, and the warm start of CLIP's tower from that export.

The mask token: CLIP's BPE has no [MASK], so the masked-language encoder appends one row to the
token embedding: id 49408 (= the BPE vocabulary size), exactly the id open_clip's
`SimpleTokenizer(additional_special_tokens=["<mask>"])` gives "<mask>".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from safetensors.torch import load_file

from pretrain.checkpoint import EXPORT, TEXT_CARD, TEXT_WEIGHTS
from pretrain.errors import ModelError

MASK_TOKEN = "<mask>"
# The architecture keys a warm start must match; the rest of the card may differ.
MATCHING_KEYS = ("context_length", "width", "heads", "layers", "mlp_ratio")


class CaptionTokenizer:
    """list[str] -> token ids (B, context_length) int64: CLIP's BPE with start/end tokens,
    zero padded, truncated at the context length. Picklable, for DataLoader workers."""

    def __init__(self, context_length: int):
        self.context_length = context_length
        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self.tokenizer.encoder)
        self.start_id = self.tokenizer.sot_token_id
        self.end_id = self.tokenizer.eot_token_id
        self.pad_id = 0  # open_clip pads with 0 (which is also the BPE token "!")
        self.mask_id = self.vocab_size  # the one id the masked-language encoder adds

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), context_length=self.context_length)

    def settings(self) -> dict:
        """What rebuilds this tokenizer with open_clip alone (for the export card)."""
        return {
            "class": "open_clip.tokenizer.SimpleTokenizer",
            "context_length": self.context_length,
            "additional_special_tokens": [MASK_TOKEN],
            "start_token_id": self.start_id,
            "end_token_id": self.end_id,
            "pad_token_id": self.pad_id,
            "mask_token_id": self.mask_id,
        }


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


@dataclass
class TextEncoderSpec:
    """What rebuilds a masked-language text encoder: `TextTransformer(**kwargs)` from open_clip,
    and the tokenizer settings. Written into the export card."""

    kwargs: dict
    tokenizer: dict = field(default_factory=dict)
    name: str = "open_clip TextTransformer (bidirectional)"

    def create(self) -> TextTransformer:
        return TextTransformer(**self.kwargs)

    def card(self) -> dict:
        return {
            "open_clip_class": "open_clip.transformer.TextTransformer",
            "open_clip_kwargs": dict(self.kwargs),
            "tokenizer": dict(self.tokenizer),
            "rebuild": (
                "TextTransformer(**open_clip_kwargs).load_state_dict(load_file("
                f"'{TEXT_WEIGHTS}'), strict=True); ids from SimpleTokenizer(context_length="
                "..., additional_special_tokens=['<mask>']); forward(ids) -> [B, T, width] "
                "(pool_type 'none'; attention is bidirectional and ignores padding, id 0)"
            ),
        }


def bidirectional_text_spec(
    tokenizer: CaptionTokenizer, width: int, layers: int, heads: int
) -> TextEncoderSpec:
    """The masked-language encoder: CLIP's text transformer without the causal mask, keys at
    padding (id 0) masked out, one extra embedding row for the mask token, no pooling and no
    projection: forward(ids [B, T]) -> per-token features [B, T, width] after the final norm."""
    kwargs = {
        "context_length": tokenizer.context_length,
        "vocab_size": tokenizer.vocab_size + 1,  # + the mask token
        "width": width,
        "heads": heads,
        "layers": layers,
        "mlp_ratio": 4.0,
        "output_dim": None,
        "no_causal_mask": True,
        "use_pad_mask": True,
        "pad_id": tokenizer.pad_id,
        "pool_type": "none",
    }
    return TextEncoderSpec(kwargs, tokenizer.settings())


# --- warm start of CLIP's text tower ---------------------------------------------------------


def find_text_card(path: str | Path) -> Path:
    """The text encoder card of an `mlm` run directory, its export folder, or the card itself."""
    path = Path(path)
    for candidate in (path, path / TEXT_CARD, path / EXPORT / TEXT_CARD):
        if candidate.is_file() and candidate.name == TEXT_CARD:
            return candidate
    raise ModelError(f"no text encoder export at {path} (expected {path / EXPORT / TEXT_CARD})")


def load_text_encoder(tower: TextTransformer, path: str | Path) -> None:
    """Start `tower` (CLIP's text tower) from an `mlm` export: every part the two share.

    The card decides what matches: context length, width, heads, layers and MLP ratio must be
    equal, else one ModelError line names the differences. The token embedding's rows beyond
    the tower's vocabulary (the mask token) stay behind; the tower's own projection
    (`text_projection`), which the masked-language encoder lacks, keeps its initialisation.
    Attention is the tower's own (causal for CLIP): masks are not weights.
    """
    card_path = find_text_card(path)
    kwargs = json.loads(card_path.read_text()).get("open_clip_kwargs", {})
    ours = {
        "context_length": tower.context_length,
        "width": tower.width,
        "heads": tower.heads,
        "layers": tower.transformer.layers,
        "mlp_ratio": tower.transformer.resblocks[0].mlp.c_fc.out_features / tower.width,
    }
    different = [
        f"{key} {kwargs.get(key)} vs {ours[key]}"
        for key in MATCHING_KEYS
        if kwargs.get(key) != ours[key]
    ]
    if kwargs.get("vocab_size", 0) < tower.vocab_size:
        different.append(f"vocab_size {kwargs.get('vocab_size')} vs {tower.vocab_size}")
    if different:
        raise ModelError(
            f"the text encoder at {card_path.parent} does not fit this text tower: "
            f"{', '.join(different)} (export vs tower)"
        )
    weights = load_file(str(card_path.with_name(TEXT_WEIGHTS)))
    if "token_embedding.weight" in weights:  # its rows beyond the BPE vocabulary: the mask token
        weights["token_embedding.weight"] = weights["token_embedding.weight"][: tower.vocab_size]
    try:
        missing, unexpected = tower.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        raise ModelError(
            f"the text encoder at {card_path.parent} does not fit: {' '.join(str(error).split())}"
        ) from None
    own = {"text_projection", "text_projection.weight", "text_projection.bias"}
    missing = [name for name in missing if name not in own]
    if missing or unexpected:
        raise ModelError(
            f"the text encoder at {card_path.parent} does not fit this text tower: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
