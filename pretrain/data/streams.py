"""Seeded streams of batches: resampled and endless for training, exact for evaluation.

    training:   per (rank, worker) stream: draw shards with replacement -> tar samples -> shuffle
                buffer -> decode -> transform -> batch; exactly steps_per_epoch batches per rank
                and epoch (TrainEpoch); TrainingStream chains the epochs and resumes at any step
    evaluation: shards split by rank, then by worker -> tar samples -> decode -> transform ->
                batch; every sample once across all ranks and workers, last batch partial

Batches are dicts: "image" [B, 3, H, W] float, "label" [B] int64 when the shards are labelled,
"key" list[str], plus whatever else the sample transform returns (ints -> int64 [B], floats ->
float32 [B], tensors stacked, strings -> lists).

Ranks are given explicitly (never read from torch.distributed or the environment, as
webdataset's split_by_node does), and these loaders must not go through accelerator.prepare,
which would split the already split stream again.
"""

import contextlib
import itertools
import os
import random
from collections.abc import Callable, Iterator, Sequence

import webdataset as wds
from torch.utils.data import IterableDataset

from pretrain.data.loader import ShardLoader
from pretrain.data.samples import (
    POSITION,
    CollateAndFinish,
    SeededTransform,
    SkipCounter,
    decoder_for,
    mix_seeds,
    read_shard,
    same_fields,
    with_skip_reports,
    worker_info,
)
from pretrain.data.shards import shard_urls
from pretrain.errors import DataError

# ----------------------------------------------------------------------------------------------
# Training: resampled, seeded, a fixed number of batches per rank


def _share(count: int, parts: int, part: int) -> int:
    """How many of the items 0..count-1 fall to `part` when dealt round-robin to `parts`."""
    return count // parts + (1 if part < count % parts else 0)


def _resampled_samples(urls: list[str], rng: random.Random, counter: SkipCounter):
    """Endless raw samples from shards drawn with replacement.

    A stream whose shards all fail would otherwise spin forever; after many fruitless draws in
    a row (far more than bad luck explains while any shard is readable) it raises instead.
    """
    fruitless, limit = 0, 10 * len(urls) + 100
    while True:
        url = urls[rng.randrange(len(urls))]
        got_any = False
        for sample in read_shard(url, counter):
            got_any = True
            yield sample
        fruitless = 0 if got_any else fruitless + 1
        if fruitless >= limit:
            raise DataError(f"no readable sample in {limit} shard draws in a row (last: {url})")


def _numbered(samples: Iterator[dict]) -> Iterator[dict]:
    for position, sample in enumerate(samples):
        sample[POSITION] = position
        yield sample


# More unreadable samples in a row than this means the data is broken, not unlucky: it must
# exceed a whole bad shard seen through the shuffle buffer.
MAX_UNREADABLE_IN_A_ROW = 100_000


class TrainEpoch(IterableDataset):
    """One rank's training batches for one epoch, produced inside each DataLoader worker.

    The DataLoader takes batches from its workers round-robin, starting at worker 0, so batch i
    of the epoch comes from "stream" i % num_workers. Each stream is seeded by (seed, epoch,
    rank, stream) and yields its share of steps_per_epoch batches, which makes the rank total
    exact. To resume at start_step, worker w plays stream (w + start_step) % num_workers, so the
    round-robin picks up at batch start_step, and each stream drops the raw samples of its
    batches before start_step before decoding them.
    """

    def __init__(
        self,
        urls,
        transform,
        batch_size,
        steps_per_epoch,
        epoch,
        seed,
        rank,
        shuffle_buffer,
        start_step,
    ):
        super().__init__()
        self.urls = list(urls)
        self.transform = transform
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.epoch = epoch
        self.seed = seed
        self.rank = rank
        self.shuffle_buffer = shuffle_buffer
        self.start_step = start_step

    def __iter__(self):
        worker, num_workers = worker_info()
        stream = (worker + self.start_step) % num_workers
        done = _share(self.start_step, num_workers, stream)
        remaining = _share(self.steps_per_epoch, num_workers, stream) - done
        seeds = (self.seed, self.epoch, self.rank, stream)
        counter = SkipCounter(max_in_a_row=MAX_UNREADABLE_IN_A_ROW)

        raw = _resampled_samples(self.urls, random.Random(mix_seeds(*seeds, 0)), counter)
        shuffled = wds.shuffle(
            self.shuffle_buffer,
            initial=self.shuffle_buffer,
            rng=random.Random(mix_seeds(*seeds, 1)),
        )(raw)
        # Exact skip when the skipped samples all decode; each unreadable one among them would
        # shift the resumed stream by one sample.
        kept = itertools.islice(_numbered(shuffled), done * self.batch_size, None)
        decoded = wds.map(decoder_for(self.transform), handler=counter)(kept)
        seeded = SeededTransform(self.transform, counter, seeds)
        transformed = wds.map(seeded, handler=counter)(decoded)
        complete = same_fields(transformed, counter)
        batching = wds.batched(
            self.batch_size, collation_fn=CollateAndFinish(self.transform), partial=False
        )
        batches = batching(complete)
        yield from with_skip_reports(itertools.islice(batches, remaining), worker, counter)


# ----------------------------------------------------------------------------------------------
# Evaluation: exact, every sample once


class EvalPass(IterableDataset):
    """All samples of the given shards (one rank's), split over DataLoader workers by shard."""

    def __init__(self, urls, transform, batch_size):
        super().__init__()
        self.urls = list(urls)
        self.transform = transform
        self.batch_size = batch_size

    def __iter__(self):
        worker, num_workers = worker_info()
        counter = SkipCounter()
        raw = (
            sample for url in self.urls[worker::num_workers] for sample in read_shard(url, counter)
        )
        decoded = wds.map(decoder_for(self.transform), handler=counter)(raw)
        transformed = wds.map(SeededTransform(self.transform, counter, None), handler=counter)(
            decoded
        )
        complete = same_fields(transformed, counter)
        batching = wds.batched(
            self.batch_size, collation_fn=CollateAndFinish(self.transform), partial=True
        )
        batches = batching(complete)
        yield from with_skip_reports(batches, worker, counter)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DataError(message)


def train_loader(
    shards: str | os.PathLike | Sequence[str],
    sample_transform: Callable[[dict], dict],
    batch_size: int,
    steps_per_epoch: int,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    num_workers: int,
    shuffle_buffer: int = 1000,
    start_step: int = 0,
    allow_pipe: bool = False,
) -> ShardLoader:
    """Training batches for one epoch on one rank: exactly steps_per_epoch - start_step of them.

    Every (rank, worker) draws shards with replacement and shuffles samples through a buffer,
    both seeded by (seed, epoch, rank, worker); transforms are seeded per sample. The batches
    are a function of (shards, transform, batch_size, steps_per_epoch, seed, epoch, rank,
    num_workers, shuffle_buffer): the same arguments give the same batches, and start_step=k
    gives the batches k, k+1, ... of the uninterrupted epoch. Batches are always full.
    `shards`: a spec string (see expand_shards) or the list expand_shards returned.
    """
    _check(batch_size >= 1, f"batch_size must be at least 1, got {batch_size}")
    _check(steps_per_epoch >= 1, f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    _check(
        0 <= start_step <= steps_per_epoch,
        f"start_step must be in 0..{steps_per_epoch}, got {start_step}",
    )
    _check(0 <= rank < world_size, f"rank {rank} is outside world size {world_size}")
    _check(num_workers >= 0, f"num_workers must be at least 0, got {num_workers}")
    _check(shuffle_buffer >= 0, f"shuffle_buffer must be at least 0, got {shuffle_buffer}")
    urls = shard_urls(shards, allow_pipe)
    stream = TrainEpoch(
        urls,
        sample_transform,
        batch_size,
        steps_per_epoch,
        epoch,
        seed,
        rank,
        shuffle_buffer,
        start_step,
    )
    return ShardLoader(
        stream,
        num_workers,
        seed=mix_seeds(seed, epoch, rank),
        num_batches=steps_per_epoch - start_step,
    )


def eval_loader(
    shards: str | os.PathLike | Sequence[str],
    sample_transform: Callable[[dict], dict],
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    allow_pipe: bool = False,
) -> ShardLoader:
    """Every sample exactly once across ranks and workers, in shard order, no padding.

    Shards are dealt to ranks round-robin (shard i -> rank i % world_size), then to workers the
    same way. Ranks can get different sample counts (gather without padding); a rank without
    shards yields nothing. The last batch of each worker may be partial.
    """
    _check(batch_size >= 1, f"batch_size must be at least 1, got {batch_size}")
    _check(0 <= rank < world_size, f"rank {rank} is outside world size {world_size}")
    _check(num_workers >= 0, f"num_workers must be at least 0, got {num_workers}")
    rank_urls = shard_urls(shards, allow_pipe)[rank::world_size]
    stream = EvalPass(rank_urls, sample_transform, batch_size)
    # Workers beyond the shard count would only start and stop.
    return ShardLoader(stream, min(num_workers, len(rank_urls)), seed=0, num_batches=None)


class TrainingStream:
    """Endless training batches for one rank: resampled epochs of steps_per_epoch micro-batches
    each (train_loader), so every rank takes the same number of steps and the position after
    micro-step s is (epoch, offset) = divmod(s, steps_per_epoch): a run resumed at any step sees
    the batches an uninterrupted run would have seen.

    `starting_workers`: a context manager around the start of each epoch's loader workers (the
    engine blocks its stop signals there, so the forked workers inherit the block).
    """

    def __init__(
        self,
        shards: list[str],
        sample_transform: Callable[[dict], dict],
        batch_size: int,
        steps_per_epoch: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        shuffle_buffer: int,
        allow_pipe: bool = False,
        starting_workers: Callable = contextlib.nullcontext,
    ):
        self.loader_arguments = dict(
            shards=shards,
            sample_transform=sample_transform,
            batch_size=batch_size,
            steps_per_epoch=steps_per_epoch,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            allow_pipe=allow_pipe,
        )
        self.steps_per_epoch = steps_per_epoch
        self.starting_workers = starting_workers
        self.epoch = 0
        self._skipped_in_past_epochs = 0
        self._loader: ShardLoader | None = None

    @property
    def skipped(self) -> int:
        """Samples and shard reads skipped on this rank since the stream started."""
        current = self._loader.skipped if self._loader is not None else 0
        return self._skipped_in_past_epochs + current

    def batches(self, start_micro_step: int = 0) -> Iterator[dict]:
        self.epoch, offset = divmod(start_micro_step, self.steps_per_epoch)
        while True:
            self._loader = train_loader(
                **self.loader_arguments, epoch=self.epoch, start_step=offset
            )
            batches = iter(self._loader)
            with self.starting_workers():  # the loader's worker processes start here
                first = next(batches, None)
            if first is None:
                raise RuntimeError("the training shards yielded no readable samples")
            yield first
            yield from batches
            self._skipped_in_past_epochs += self._loader.skipped
            self.epoch, offset = self.epoch + 1, 0
