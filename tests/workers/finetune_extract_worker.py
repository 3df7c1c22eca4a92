"""Launched by test_finetune_features under torchrun: extract features of label-coded shards on
this rank and save what this rank ended up with.

argv: SHARD_DIR OUT_DIR. Writes OUT_DIR/rank{R}.pt with the gathered FeatureSet, how many
images this rank encoded itself, and the cache hit flags of two identical calls.
"""

import sys
from pathlib import Path

import torch

from finetune.features import SampleTransform, cached_features, extract_features
from pretrain.data import expand_shards
from pretrain.data.transforms import eval_transform
from pretrain.distributed import make_accelerator


class CountingMeanColour:
    """images [B, 3, H, W] -> mean colour [B, 3]; counts the images this process encoded."""

    def __init__(self):
        self.encoded = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += len(images)
        return images.mean(dim=(2, 3))


if __name__ == "__main__":
    shard_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    accelerator = make_accelerator("no", None)
    urls = expand_shards(str(shard_dir / "train-index.json"))
    transform = SampleTransform(eval_transform(8).image_transform)
    encode = CountingMeanColour()

    def extract():
        return extract_features(
            encode, urls, transform, accelerator, batch_size=3, num_workers=2, description="t"
        )

    identity = {"test": "label-coded shards"}
    first, first_cached = cached_features(out_dir / "cache", identity, accelerator, extract)
    encoded_first = encode.encoded
    second, second_cached = cached_features(out_dir / "cache", identity, accelerator, extract)
    subset = extract_features(
        encode, urls, transform, accelerator, batch_size=3, num_workers=2, max_samples=9, seed=5
    )
    torch.save(
        {
            "features": vars(first),
            "encoded_here": encoded_first,
            "cached": [first_cached, second_cached],
            "second_keys": second.keys,
            "subset": vars(subset),
            "world": accelerator.num_processes,
        },
        out_dir / f"rank{accelerator.process_index}.pt",
    )
