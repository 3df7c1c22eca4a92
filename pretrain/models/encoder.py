"""Encoder factory over timm: any timm model name, created headless (`num_classes=0`).

The returned `EncoderSpec` is exactly what is needed to build the same architecture again with
`timm.create_model(spec.name, **spec.kwargs)`; it is written next to the exported weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch.nn as nn

from pretrain.errors import ModelError


@dataclass
class EncoderSpec:
    name: str
    kwargs: dict = field(default_factory=dict)

    def create(self) -> nn.Module:
        try:
            return timm.create_model(self.name, pretrained=False, **self.kwargs)
        except TypeError as error:  # timm hands unknown kwargs to the model's __init__
            raise ModelError(f"timm model '{self.name}' rejects its arguments: {error}") from None


def build_encoder(
    name: str, image_size: int, patch_size: int | None, extra: dict
) -> tuple[nn.Module, EncoderSpec]:
    """A headless timm encoder for `image_size` inputs, and the spec that rebuilds it.

    Patch models (ViT, DeiT, EVA, ...) take `img_size` and `patch_size`; convolutional ones do not
    and reject them with a TypeError, so those are retried without the two size arguments.
    """
    if not timm.is_model(name):
        raise ModelError(f"unknown timm model '{name}' (see timm.list_models())")
    plain = {"num_classes": 0, **extra}
    sized = {"img_size": image_size, **plain}
    if patch_size:
        sized = {"patch_size": patch_size, **sized}
    for kwargs in (sized, plain):
        spec = EncoderSpec(name=name, kwargs=kwargs)
        try:
            return timm.create_model(name, pretrained=False, **kwargs), spec
        except TypeError:
            continue
    return spec.create(), spec  # raises ModelError with timm's message


def encoder_from_config(config) -> tuple[nn.Module, EncoderSpec]:
    """The run's encoder: `model.*` keys of a pretrain Config at `data.image_size`."""
    model = config.model
    return build_encoder(model.name, config.data.image_size, model.patch_size, model.kwargs)
