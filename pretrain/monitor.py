"""Online kNN evaluation during pretraining: is the representation improving, not only the loss?

Opt in with `monitor.every=N`. Before the first step, every N optimizer steps and after the last,
the current encoder (eval mode, no gradient) embeds a fixed labelled subset, and each sample of
it is classified by its k nearest others (leave-one-out weighted kNN: k=20, cosine, T=0.07, the
scoring of `finetune knn`, pretrain.knn). Its top-1 goes to metrics.jsonl and W&B as
`knn_top1` (with `knn_s`, the seconds it took) and onto the progress bar.

    labelled shards: monitor.shards, else data.val_shards, else the train shards if labelled
    --the first shards holding monitor.samples, split by process (each sample once)-->
    decoded once at the start, resized and cropped, kept as uint8 [n_r, 3, H, W]
    --a seeded subset of monitor.samples, chosen by sample key-->
    every evaluation: encode this process's share -> [n_r, D] --gather, key order--> [N, D]
    --leave-one-out kNN--> top-1

The subset is the same for the whole run and across resumes, so successive values compare, and
the same on any number of processes (every sample is embedded once; features are put in key
order). The evaluation keeps every RNG state as it found it and leaves the training batches
alone, so a run trains, and resumes, exactly as with the monitor off.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn as nn
from torchvision import transforms as T

from pretrain.data import eval_loader, expand_shards, peek_fields, shards_covering
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from pretrain.distributed import gather_objects, gather_rows
from pretrain.errors import ConfigError, DataError
from pretrain.knn import knn_scores

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class MonitorConfig:
    # Online kNN top-1 of the encoder every this many optimizer steps (and before the first
    # and after the last); 0: off.
    every: int = 0
    # Labelled shards to evaluate on; empty: data.val_shards, else the train shards (if labelled).
    shards: str = ""
    samples: int = 2000  # the fixed subset: at most this many samples of those shards
    k: int = 20
    temperature: float = 0.07
    # Features as finetune's data.pool: mean of the patch tokens, or the class token (ViTs).
    pool: Literal["avg", "cls"] = "avg"
    batch_size: int = 256  # images per forward pass


def pooled_features(encoder: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    """[B, 3, H, W] -> [B, D]: what `finetune`'s frozen features are after set_pooling(pool),
    computed without changing the live encoder. Token models (timm ViTs: num_prefix_tokens)
    pool their tokens; other models (CNNs) return their own average-pooled features."""
    prefix = getattr(encoder, "num_prefix_tokens", None)
    if prefix is None:
        return encoder(images)
    tokens = encoder.forward_features(images)  # [B, prefix + L, D]
    pooled = tokens[:, prefix:].mean(dim=1) if pool == "avg" else tokens[:, 0]  # [B, D]
    fc_norm = getattr(encoder, "fc_norm", None)  # Identity unless built for avg pooling
    return fc_norm(pooled) if fc_norm is not None else pooled


@contextlib.contextmanager
def rng_states_kept():
    """Whatever runs inside leaves python's, numpy's and torch's RNGs as it found them."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class OnlineKnn:
    """The monitor of one run: the subset in memory, and its evaluation (on every process)."""

    def __init__(self, settings: MonitorConfig, accelerator: Accelerator, subset: dict):
        self.settings = settings
        self.accelerator = accelerator
        self.images = subset["images"]  # [n_r, 3, H, W] uint8: this process's share
        self.counts = subset["counts"]  # samples per process
        self.order = subset["order"]  # [N]: gathered rows (rank order) -> key order
        self.labels = subset["labels"]  # [N] in key order
        self.num_classes = int(self.labels.max()) + 1
        self.last: float | None = None

    @classmethod
    def start(
        cls, config, accelerator: Accelerator, train_urls: list[str], encoder: nn.Module
    ) -> OnlineKnn | None:
        """None when monitor.every is 0; else load the subset (one line if there is none).
        `encoder`: the run's, to check that it has what monitor.pool asks for."""
        settings = config.monitor
        if settings.every <= 0:
            return None
        if settings.samples < 2 or settings.k < 1 or settings.temperature <= 0:
            raise ConfigError(
                "monitor.samples must be at least 2, monitor.k at least 1 and "
                "monitor.temperature positive"
            )
        if settings.pool == "cls" and getattr(encoder, "cls_token", None) is None:
            raise ConfigError(f"monitor.pool=cls: {config.model.name} has no class token; use avg")
        urls = _labelled_shards(config, train_urls, settings.samples)
        with rng_states_kept():
            subset = _load_subset(urls, config, accelerator)
        if accelerator.is_main_process:
            samples = len(subset["labels"])
            print(
                f"monitor: kNN top-1 on {samples} labelled samples every {settings.every} steps",
                file=sys.stderr,
                flush=True,
            )
        return cls(settings, accelerator, subset)

    def due(self, done: int, total_steps: int) -> bool:
        return done % self.settings.every == 0 or done == total_steps

    def report(self, encoder: nn.Module, tracker, step: int) -> dict:
        """Evaluate (every process) and log {"knn_top1", "knn_s"} at `step` (main process)."""
        started = time.perf_counter()
        top1 = self.evaluate(encoder)
        metrics = {"knn_top1": top1, "knn_s": time.perf_counter() - started}
        tracker.log(metrics, step=step)
        return metrics

    @torch.no_grad()
    def features(self, encoder: nn.Module) -> torch.Tensor:
        """[N, D] features of the whole subset in key order, on every process (each process
        embeds its own share in eval mode; `encoder`: the unwrapped module)."""
        was_training = encoder.training
        encoder.eval()
        with rng_states_kept():
            local = self._embed(encoder)  # [n_r, D]
        encoder.train(was_training)
        return gather_rows(self.accelerator, local, self.counts)[self.order]

    def evaluate(self, encoder: nn.Module) -> float:
        """Leave-one-out kNN top-1 of `encoder` on the subset."""
        features = self.features(encoder)  # [N, D]
        settings = self.settings
        scores = knn_scores(
            features,
            self.labels,
            features,
            self.num_classes,
            settings.k,
            settings.temperature,
            exclude_self=True,
        )
        self.last = (scores.argmax(dim=1) == self.labels).double().mean().item()
        return self.last

    def _embed(self, encoder: nn.Module) -> torch.Tensor:
        device, accelerator = self.accelerator.device, self.accelerator
        dtype = next(encoder.parameters()).dtype
        mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1)
        parts = [torch.zeros(0, encoder.num_features, dtype=dtype)]
        for start in range(0, len(self.images), self.settings.batch_size):
            pixels = self.images[start : start + self.settings.batch_size].to(device)
            images = (pixels.to(dtype) / 255 - mean) / std  # [b, 3, H, W]
            with accelerator.autocast():
                pooled = pooled_features(encoder, images, self.settings.pool)
            parts.append(pooled.to(dtype).cpu())  # [b, D]
        return torch.cat(parts)


def _labelled_shards(config, train_urls: list[str], samples: int) -> list[str]:
    """The shards to monitor on, checked to carry labels (one line when they do not)."""
    settings, data = config.monitor, config.data
    if settings.shards or data.val_shards:
        key = "monitor.shards" if settings.shards else "data.val_shards"
        urls = expand_shards(settings.shards or data.val_shards, allow_pipe=data.allow_pipe)
    else:
        key, urls = "data.train_shards", train_urls
    urls = shards_covering(urls, samples)
    fields = peek_fields(urls)
    if fields is None:
        raise DataError(f"monitor: no readable sample in the {key} shards ({urls[0]} ...)")
    if "cls" not in fields:
        raise ConfigError(
            f"monitor.every is set, but the online kNN needs labelled data and the {key} shards "
            "carry no class labels (cls): set monitor.shards (or data.val_shards) to labelled "
            "shards, or monitor.every=0"
        )
    return urls


def _load_subset(urls: list[str], config, accelerator: Accelerator) -> dict:
    """Decode this process's share once; choose the seeded subset by key, the same on any
    number of processes; {"images", "counts", "order", "labels"}."""
    size, settings = config.data.image_size, config.monitor
    # eval_transform's resize and crop, kept as uint8 (a quarter of the memory); normalized
    # per batch when embedded, which gives the same float values.
    resize = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.PILToTensor(),
        ]
    )
    loader = eval_loader(
        urls,
        ImageTransform(resize),
        settings.batch_size,
        accelerator.process_index,
        accelerator.num_processes,
        num_workers=0,
        allow_pipe=config.data.allow_pipe,
    )
    images, labels, keys = [], [], []
    for batch in loader:
        images.append(batch["image"])
        labels.append(batch["label"])
        keys.extend(batch["key"])
    everyone = gather_objects(accelerator, keys)  # every process's keys, rank order
    all_keys = sorted(key for part in everyone for key in part)
    chosen = set(all_keys)
    if len(all_keys) > settings.samples:
        generator = torch.Generator().manual_seed(config.train.seed)
        picks = torch.randperm(len(all_keys), generator=generator)[: settings.samples]
        chosen = {all_keys[pick] for pick in picks.tolist()}
    keep = torch.tensor([key in chosen for key in keys], dtype=torch.bool)
    local_images = torch.cat(images)[keep] if images else torch.zeros(0, 3, size, size)
    local_labels = torch.cat(labels)[keep] if labels else torch.zeros(0, dtype=torch.int64)
    kept_keys = [key for key, kept in zip(keys, keep.tolist()) if kept]
    everyone = gather_objects(accelerator, (kept_keys, local_labels.tolist()))
    gathered_keys = [key for part in everyone for key in part[0]]
    gathered_labels = torch.tensor([label for part in everyone for label in part[1]])
    order = torch.tensor(sorted(range(len(gathered_keys)), key=gathered_keys.__getitem__))
    if len(gathered_keys) < 2:
        raise DataError(f"monitor: fewer than 2 readable labelled samples in {urls[0]} ...")
    return {
        "images": local_images.to(torch.uint8),
        "counts": [len(part[0]) for part in everyone],
        "order": order,
        "labels": gathered_labels[order],
    }
