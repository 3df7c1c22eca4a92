"""The data layer: shards written, read, decoded, transformed, batched.

shards.py      shard specs -> shard urls; sample counts from the index files
write.py       samples -> tar shards + index (the one format); sources.py: ImageFolder trees;
               unlabelled.py: plain folders and path lists; captions.py: caption lists;
               demo.py: the embedded demo set; cli.py: `pretrain shards`
samples.py     per-sample stages: read, decode, seeded transform, collate, skip counts
streams.py     training (resampled, seeded, endless) and evaluation (exact) streams
loader.py      the DataLoader around a stream, with skip counting
transforms.py  every sample transform (view_params.py: SimCLR's per-view random draws)
"""

from pretrain.data.captions import write_captions
from pretrain.data.demo import demo_shards, ensure_demo_data, use_demo_data_if_unset, write_demo
from pretrain.data.loader import ShardLoader
from pretrain.data.samples import collate, decode_sample, peek_fields, require_fields
from pretrain.data.shards import count_samples, expand_shards, shards_covering
from pretrain.data.sources import write_imagefolder
from pretrain.data.streams import TrainingStream, eval_loader, train_loader
from pretrain.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    mae_train_transform,
)
from pretrain.data.unlabelled import write_image_list, write_images
from pretrain.data.write import write_shards
from pretrain.errors import DataError

__all__ = [
    "DataError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ShardLoader",
    "TrainingStream",
    "collate",
    "count_samples",
    "decode_sample",
    "demo_shards",
    "ensure_demo_data",
    "eval_loader",
    "eval_transform",
    "expand_shards",
    "mae_train_transform",
    "peek_fields",
    "require_fields",
    "shards_covering",
    "train_loader",
    "use_demo_data_if_unset",
    "write_captions",
    "write_demo",
    "write_image_list",
    "write_imagefolder",
    "write_images",
    "write_shards",
]
