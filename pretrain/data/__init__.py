"""Shard writing (ImageFolder, caption lists, embedded demo set), shard reading, transforms.

The public names below are imported lazily (PEP 562 `__getattr__`): importing every submodule
here would put `pretrain.data.write` into sys.modules before `python -m pretrain.data.write`
runs it, and runpy then warns about executing an already imported module.
"""

import importlib
from typing import TYPE_CHECKING

from pretrain.data.errors import DataError

_HOME_OF = {
    "write_shards": "write",
    "write_imagefolder": "write",
    "write_captions": "write",
    "write_demo": "demo",
    "ensure_demo_data": "demo",
    "expand_shards": "read",
    "count_samples": "read",
    "train_loader": "read",
    "eval_loader": "read",
    "ShardLoader": "read",
    "decode_sample": "read",
    "collate": "read",
    "mae_train_transform": "transforms",
    "eval_transform": "transforms",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
}

__all__ = [
    "DataError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ShardLoader",
    "collate",
    "count_samples",
    "decode_sample",
    "ensure_demo_data",
    "eval_loader",
    "eval_transform",
    "expand_shards",
    "mae_train_transform",
    "train_loader",
    "write_captions",
    "write_demo",
    "write_imagefolder",
    "write_shards",
]

if TYPE_CHECKING:
    from pretrain.data.demo import ensure_demo_data, write_demo
    from pretrain.data.read import (
        ShardLoader,
        collate,
        count_samples,
        decode_sample,
        eval_loader,
        expand_shards,
        train_loader,
    )
    from pretrain.data.transforms import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        eval_transform,
        mae_train_transform,
    )
    from pretrain.data.write import write_captions, write_imagefolder, write_shards


def __getattr__(name: str):
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_HOME_OF[name]}")
    return getattr(module, name)
