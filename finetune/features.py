"""One pass of a frozen encoder over shards -> features [N, D] lined up with labels [N].

    shards --split by process (pretrain.data.eval_loader: each sample exactly once)--> per
    process: images -> encode -> features [n_r, D], labels [n_r], keys, captions
    --gather (variable n_r, no padding rows kept)--> every process: all N rows
    --sort by sample key--> the same order on any number of processes
    --cache on disk--> keyed by the encoder's weights, the shard files, pooling, image size,
    sample limit

Only the main process shows a progress bar and writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from tqdm import tqdm

from finetune.encoder import set_pooling, weights_fingerprint
from pretrain.data import count_samples, eval_loader, shards_covering
from pretrain.data.transforms import eval_transform
from pretrain.distributed import broadcast_from_main, gather_objects, gather_rows
from pretrain.errors import DataError

if TYPE_CHECKING:
    from finetune.job import Job

logger = logging.getLogger(__name__)

GATHER_ROWS = 16384  # rows per all-gather: bounds the device memory a gather needs
FEATURE_CACHE_VERSION = 2  # bump when extraction changes what the same inputs produce


class SampleTransform:
    """Decoded sample -> {"image": [3, H, W], "label"?, "captions"?} for feature extraction
    ("captions": all of the image's captions).

    A class, not a closure, so that it pickles into DataLoader workers.
    """

    def __init__(self, image_transform: Callable):
        self.image_transform = image_transform

    def __call__(self, sample: dict) -> dict:
        out = {"image": self.image_transform(sample["image"])}
        for name in ("label", "captions"):
            if name in sample:
                out[name] = sample[name]
        return out


@dataclass
class FeatureSet:
    features: torch.Tensor  # [N, D] float32, CPU
    labels: torch.Tensor | None  # [N] int64; None when the shards carry no `cls`
    keys: list[str]  # sample keys, sorted
    captions: list[list[str]] | None  # every image's captions, when the shards carry `txt`
    skipped: int = 0  # unreadable samples and shard reads, over all processes

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, indices: torch.Tensor) -> FeatureSet:
        rows = indices.tolist()
        return FeatureSet(
            self.features[indices],
            None if self.labels is None else self.labels[indices],
            [self.keys[row] for row in rows],
            None if self.captions is None else [self.captions[row] for row in rows],
            self.skipped,
        )

    def require_labels(self, what: str) -> torch.Tensor:
        if self.labels is None:
            raise DataError(f"the {what} shards carry no class labels (cls)")
        return self.labels


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    urls: Sequence[str],
    transform: Callable[[dict], dict],
    accelerator: Accelerator,
    batch_size: int = 256,
    num_workers: int = 2,
    max_samples: int = 0,
    seed: int = 0,
    description: str = "features",
) -> FeatureSet:
    """encode: images [B, 3, H, W] on the accelerator's device -> features [B, D].

    Every process reads its share of the shards and returns the full, key-sorted set.
    max_samples > 0: a seeded random subset of that many samples, drawn from the first shards
    that hold enough (identical on any process count).
    """
    urls = shards_covering(urls, max_samples)
    local = _encode_local_share(
        encode, urls, transform, accelerator, batch_size, num_workers, description
    )
    result = _gather_everyone(accelerator, local, urls)
    if 0 < max_samples < len(result):
        generator = torch.Generator().manual_seed(seed)
        subset = torch.randperm(len(result), generator=generator)[:max_samples].sort().values
        result = result.select(subset)
    return result


def _encode_local_share(
    encode, urls, transform, accelerator: Accelerator, batch_size, num_workers, description
) -> dict:
    """This process's share of the shards, encoded: {"features": [n, D] list of batches,
    "labels", "keys", "captions", "skipped"}."""
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = eval_loader(urls, transform, batch_size, rank, world, num_workers)
    features, labels, keys, captions = [], [], [], []
    progress = tqdm(
        total=count_samples(urls[rank::world]) if urls[rank::world] else 0,
        desc=description,
        unit="img",
        disable=not accelerator.is_main_process,
        file=sys.stderr,
        leave=False,
    )
    for batch in loader:
        with accelerator.autocast():
            encoded = encode(batch["image"].to(accelerator.device, non_blocking=True))
        features.append(encoded.float().cpu())  # [B, D]
        if "label" in batch:
            labels.append(batch["label"])
        if "captions" in batch:
            captions.extend(batch["captions"])
        keys.extend(batch["key"])
        progress.update(len(batch["key"]))
    progress.close()
    return {"features": features, "labels": labels, "keys": keys, "captions": captions,
            "skipped": loader.skipped}  # fmt: skip


def _gather_everyone(accelerator: Accelerator, local: dict, urls: Sequence[str]) -> FeatureSet:
    """Every process's rows on every process (no padding rows), sorted by sample key."""
    features, labels, keys, captions = (
        local[k] for k in ("features", "labels", "keys", "captions")
    )
    described = {
        "count": len(keys),
        "dim": features[0].shape[1] if features else None,
        "labelled": len(labels) == len(features) and bool(features),
        "captioned": len(captions) == len(keys) and bool(keys),
        "keys": keys,
        "captions": captions,
        "skipped": local["skipped"],
    }
    everyone = gather_objects(accelerator, described)  # one dict per process, in rank order
    with_samples = [part for part in everyone if part["count"]]
    if not with_samples:
        raise DataError(f"no readable samples in {urls[0]}" + (" ..." if len(urls) > 1 else ""))
    dim = with_samples[0]["dim"]
    labelled = all(part["labelled"] for part in with_samples)
    captioned = all(part["captioned"] for part in with_samples)
    counts = [part["count"] for part in everyone]

    local_features = torch.cat(features) if features else torch.zeros(0, dim)
    all_features = gather_rows(accelerator, local_features, counts, GATHER_ROWS)
    all_labels = None
    if labelled:
        local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        all_labels = gather_rows(accelerator, local_labels[:, None], counts, GATHER_ROWS)[:, 0]
    all_keys = [key for part in everyone for key in part["keys"]]
    all_captions = [text for part in everyone for text in part["captions"]] if captioned else None

    order = sorted(range(len(all_keys)), key=all_keys.__getitem__)
    if len(set(all_keys)) != len(all_keys):
        logger.warning("duplicate sample keys: their relative order may vary between runs")
    return FeatureSet(
        all_features,
        all_labels,
        all_keys,
        all_captions,
        skipped=sum(part["skipped"] for part in everyone),
    ).select(torch.tensor(order, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# The cache


def shard_fingerprint(urls: Sequence[str]) -> list:
    """[url, size, mtime_ns] per local shard, [url] for remote ones: rewritten shards miss."""
    described = []
    for url in urls:
        try:
            stat = os.stat(url)
            described.append([os.path.abspath(url), stat.st_size, stat.st_mtime_ns])
        except OSError:
            described.append([url])
    return described


def cached_features(
    cache_dir: str | os.PathLike | None,
    identity: dict,
    accelerator: Accelerator,
    extract: Callable[[], FeatureSet],
) -> tuple[FeatureSet, bool]:
    """Load the features that `identity` names from cache_dir, or extract and store them.

    identity: everything the features depend on (weights fingerprint, shard fingerprint,
    pooling, image size, sample limit, ...), JSON-serialisable. Returns (features, from_cache).
    The main process decides hit or miss for everyone, so no process starts an extraction
    (and its collectives) alone.
    """
    if cache_dir is None:
        return extract(), False
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(os.fspath(cache_dir), f"{digest}.pt")
    hit = broadcast_from_main(accelerator, os.path.isfile(path))
    if hit:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return FeatureSet(**stored["features"]), True
    result = extract()
    if accelerator.is_main_process:
        os.makedirs(cache_dir, exist_ok=True)
        temporary = f"{path}.tmp-{os.getpid()}"
        stored = {"identity": identity, "features": vars(result)}
        torch.save(stored, temporary)
        os.replace(temporary, path)  # a reader sees the whole file or none
    accelerator.wait_for_everyone()
    return result, False


# ----------------------------------------------------------------------------------------------
# Frozen features of a job's encoder: linear probe and kNN (both splits), zero-shot (val images)


def job_features(
    job: Job,
    encode: Callable[[torch.Tensor], torch.Tensor],
    identity: dict,
    split: str,
    image_size: int,
    description: str,
) -> tuple[FeatureSet, bool]:
    """The `split` ("train" or "val") features that `encode` gives the job's shards at
    `image_size` (eval resize and crop), from the cache when it has them. `identity`: what else
    the features depend on (the weights' fingerprint, pooling, ...)."""
    data, source, accelerator = job.config.data, job.source, job.accelerator
    urls = job.train_urls if split == "train" else job.val_urls
    limit = data.train_samples if split == "train" else 0
    transform = SampleTransform(
        eval_transform(image_size, source.mean, source.std, data.crop_fraction).image_transform
    )
    identity = {
        "version": FEATURE_CACHE_VERSION,
        **identity,
        "image_size": image_size,
        "crop_fraction": data.crop_fraction,
        "shards": shard_fingerprint(urls),
        "max_samples": limit,
    }
    return cached_features(
        job.cache_dir,
        identity,
        accelerator,
        lambda: extract_features(
            encode,
            urls,
            transform,
            accelerator,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            max_samples=limit,
            description=description,
        ),
    )


def frozen_features(job: Job, random_init: bool) -> tuple[FeatureSet, FeatureSet, bool]:
    """Train and val features of the job's frozen encoder (labels required), cached."""
    data, source, accelerator = job.config.data, job.source, job.accelerator
    image_size = data.image_size or source.image_size
    encoder = source.create(random_init=random_init, seed=0, image_size=image_size)
    set_pooling(encoder, data.pool)
    encoder.to(accelerator.device)
    identity = {
        "weights": weights_fingerprint(encoder),
        "pool": data.pool,
        "mean": list(source.mean),
        "std": list(source.std),
    }
    label = "random-init" if random_init else "pretrained"
    splits, all_cached = [], True
    for split in ("train", "val"):
        features, cached = job_features(
            job, encoder, identity, split, image_size, f"{label} {split}"
        )
        features.require_labels(split)
        splits.append(features)
        all_cached = all_cached and cached
    if accelerator.is_main_process:
        train, val = splits
        print(
            f"{label}: {len(train)} train / {len(val)} val features of width "
            f"{train.features.shape[1]}{' (cached)' if all_cached else ''}",
            file=sys.stderr,
        )
    return splits[0], splits[1], all_cached
