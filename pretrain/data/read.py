"""Read WebDataset shards into batches: resampled and seeded for training, exact for evaluation.

    shard spec --expand_shards--> list of shard urls
    training:   per (rank, worker) stream: draw shards with replacement -> tar samples -> shuffle
                buffer -> decode -> transform -> batch; exactly steps_per_epoch batches per rank
    evaluation: shards split by rank, then by worker -> tar samples -> decode -> transform ->
                batch; every sample once across all ranks and workers, last batch partial

Batches are dicts: "image" [B, 3, H, W] float, "label" [B] int64 when the shards are labelled,
"key" list[str], plus whatever else the sample transform returns (ints -> int64 [B], floats ->
float32 [B], tensors stacked, strings -> lists). A transform with a `finish_batch(batch)` method
gets each collated batch for work cheaper done once per batch (normalizing uint8 crops).

Ranks are given explicitly (never read from torch.distributed or the environment, as
webdataset's split_by_node does), and these loaders must not go through accelerator.prepare,
which would split the already split stream again.

Unreadable data never stops a loop: a missing shard, a truncated tar, a corrupt image or a
failing transform is skipped and counted. Counts live in the worker processes, so every batch
carries its worker's running count (private fields "_worker", "_skipped") and each worker ends
with a count-only report; ShardLoader strips these and exposes the rank's total as `.skipped`.
"""

import contextlib
import functools
import glob
import io
import itertools
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from pretrain.data.errors import DataError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Shard specs

URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
GLOB_CHARACTERS = re.compile(r"[*?\[]")


def expand_shards(spec: str | os.PathLike | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Turn a shard spec into a list of shard urls (local paths checked to exist).

    A spec is a comma-separated string (or a list, or one Path) of:
      - a tar path, a brace pattern `dir/train-{000000..000009}.tar`, or a glob `dir/*.tar`
      - a shard index `dir/train-index.json`, or a folder: its one `*-index.json`, else its `*.tar`
      - an http(s)/gs/hf/... URL, passed to webdataset's gopen as it is
      - `pipe:COMMAND` (a shell command writing a tar to stdout), only with allow_pipe
    """
    if isinstance(spec, os.PathLike):
        parts = [os.fspath(spec)]
    elif isinstance(spec, str):
        parts = _split_on_top_level_commas(spec)
    else:
        parts = [os.fspath(part) for part in spec]
    parts = [part.strip() for part in parts if part.strip()]
    if not parts:
        raise DataError("no shards given (the shard spec is empty)")
    urls = [url for part in parts for url in _expand_part(part, allow_pipe)]
    return urls


def _split_on_top_level_commas(spec: str) -> list[str]:
    """'a.tar,b-{0..3}.tar' -> ['a.tar', 'b-{0..3}.tar']; commas inside braces belong to them."""
    parts, depth, start = [], 0, 0
    for position, character in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(character, 0)
        if character == "," and depth == 0:
            parts.append(spec[start:position])
            start = position + 1
    parts.append(spec[start:])
    return parts


def _refuse_pipe(url: str) -> None:
    raise DataError(
        f"pipe: shard specs run shell commands; set data.allow_pipe=true to allow them: {url}"
    )


def _expand_part(part: str, allow_pipe: bool) -> list[str]:
    if part.startswith("pipe:"):
        if not allow_pipe:
            _refuse_pipe(part)
        return list(braceexpand.braceexpand(part))
    scheme = URL_SCHEME.match(part)
    if scheme and scheme.group(1) != "file":
        if scheme.group(1) not in wds.gopen_schemes:
            raise DataError(
                f"webdataset cannot open {scheme.group(1)}:// urls; use a pipe: spec "
                f"(e.g. 'pipe:aws s3 cp {part} -') with data.allow_pipe=true"
            )
        return list(braceexpand.braceexpand(part))
    if scheme:
        part = part[len("file://") :]

    found, missing = [], []
    for path in braceexpand.braceexpand(os.path.expanduser(part)):
        if GLOB_CHARACTERS.search(path):
            found.extend(sorted(glob.glob(path)))
        elif os.path.isdir(path):
            found.extend(_shards_in_folder(path))
        elif path.endswith(".json") and os.path.isfile(path):
            found.extend(_shards_in_index(path))
        elif os.path.exists(path):
            found.append(path)
        else:
            missing.append(path)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"shard not found: {missing[0]}{more}")
    if not found:
        raise DataError(f"no shards match {part}")
    return found


def _shards_in_folder(folder: str) -> list[str]:
    indexes = sorted(glob.glob(os.path.join(glob.escape(folder), "*-index.json")))
    if len(indexes) > 1:
        names = ", ".join(os.path.basename(index) for index in indexes)
        raise DataError(f"{folder} holds several shard sets ({names}); name one, e.g. {indexes[0]}")
    if indexes:
        return _shards_in_index(indexes[0])
    tars = sorted(glob.glob(os.path.join(glob.escape(folder), "*.tar")))
    if not tars:
        raise DataError(f"no shards match {folder} (no *-index.json or *.tar in it)")
    return tars


def _read_index(path: str) -> dict:
    try:
        with open(path) as handle:
            index = json.load(handle)
        names = [shard["name"] for shard in index["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"unreadable shard index {path}: {error}") from None
    if not names:
        raise DataError(f"shard index lists no shards: {path}")
    return index


def _shards_in_index(path: str) -> list[str]:
    folder = os.path.dirname(path)
    shards = [os.path.join(folder, shard["name"]) for shard in _read_index(path)["shards"]]
    missing = [shard for shard in shards if not os.path.exists(shard)]
    if missing:
        raise DataError(f"shard not found: {missing[0]} (listed in {path})")
    return shards


def count_samples(urls: Sequence[str]) -> int | None:
    """Total samples in these shards per the `*-index.json` files beside them; None if unknown."""
    counts: dict[str, int] = {}  # shard path -> count, from every index in the shards' folders
    for folder in sorted({os.path.dirname(url) for url in urls if not URL_SCHEME.match(url)}):
        for index_path in glob.glob(os.path.join(glob.escape(folder), "*-index.json")):
            for shard in _read_index(index_path)["shards"]:
                counts[os.path.join(folder, shard["name"])] = int(shard["count"])
    if not all(url in counts for url in urls):
        return None
    return sum(counts[url] for url in urls)


# ----------------------------------------------------------------------------------------------
# Per-sample stages: reading a shard, decoding, seeded transform, collation, skip counting

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
POSITION = "__position__"  # a training sample's index in its stream; seeds its transform
LOGGED_ERRORS_PER_WORKER = 3


class SkipCounter:
    """A webdataset error handler: counts each failure, logs the first few, says "continue"."""

    def __init__(self, max_in_a_row: int | None = None):
        self.total = 0
        self.in_a_row = 0  # failures since the last good sample; bounds an endless bad stream
        self.max_in_a_row = max_in_a_row

    def __call__(self, error: BaseException) -> bool:
        self.total += 1
        self.in_a_row += 1
        if self.total <= LOGGED_ERRORS_PER_WORKER:
            logger.warning(f"skipped unreadable data: {type(error).__name__}: {str(error)[:300]}")
        if self.max_in_a_row is not None and self.in_a_row > self.max_in_a_row:
            raise DataError(f"{self.in_a_row} unreadable samples in a row; last: {error}")
        return True

    def good_sample(self) -> None:
        self.in_a_row = 0


def _read_shard(url: str, counter: SkipCounter) -> Iterator[dict]:
    """Raw samples of one shard ({"__key__", "jpg": bytes, "cls": bytes, ...}).

    When reading fails part way (truncated tar), the sample being assembled may lack fields;
    the last sample before the failure is dropped and counted, so every sample that comes out
    is complete.
    """
    failed = False

    def note_failure(error: BaseException) -> bool:
        nonlocal failed
        failed = True
        return counter(error)

    held = None
    for sample in wds.tarfile_samples([{"url": url}], handler=note_failure):
        if held is not None:
            yield held
        held = sample
    if held is None:
        return
    if failed:
        counter.total += 1
    else:
        yield held


def decode_sample(raw: dict) -> dict:
    """Raw sample -> {"image": PIL RGB image, "key": str, "label": int?, "caption": str?}."""
    field = next((name for name in IMAGE_FIELDS if name in raw), None)
    if field is None:
        fields = sorted(name for name in raw if not name.startswith("__"))
        raise ValueError(f"sample {raw.get('__key__')} has no image field (has {fields})")
    with Image.open(io.BytesIO(raw[field])) as encoded:
        image = encoded.convert("RGB")  # decodes every pixel: a truncated file fails here
    sample = {"image": image, "key": raw["__key__"]}
    if "cls" in raw:
        sample["label"] = int(raw["cls"])
    if "txt" in raw:
        sample["caption"] = raw["txt"].decode("utf-8")
    if POSITION in raw:
        sample[POSITION] = raw[POSITION]
    return sample


def _mix(*numbers: int) -> int:
    """A well-spread 64-bit seed from several integers (seed, epoch, rank, ...)."""
    entropy = [number & MASK_64 for number in numbers]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


MASK_64 = (1 << 64) - 1


def _splitmix64(state: int) -> int:
    """Cheap 64-bit mixing (SplitMix64 output function): per-sample seeds from base + index."""
    z = (state + 0x9E3779B97F4A7C15) & MASK_64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK_64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK_64
    return z ^ (z >> 31)


@contextlib.contextmanager
def _rngs_seeded(seed: int, restore: bool):
    """Seed python, numpy and torch (CPU) RNGs for one sample.

    With restore (num_workers=0: this runs in the training process itself) the caller's RNG
    states come back afterwards; in a worker process nobody else uses them, and saving numpy's
    state alone costs ~0.1 ms.
    """
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: leave CUDA RNGs alone
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class _Transform:
    """Runs the sample transform; in training with RNGs seeded by the sample's position.

    Seeding per sample makes a sample's augmentation a function of (seed, epoch, rank, stream,
    position) alone, so a resumed run that skips samples without transforming them still
    gives every later sample the same crop as an uninterrupted run.
    """

    def __init__(self, transform: Callable, counter: SkipCounter, seed_parts: tuple | None):
        self.transform = transform
        self.counter = counter
        self.base_seed = _mix(*seed_parts) if seed_parts is not None else None
        self.in_main_process = torch.utils.data.get_worker_info() is None

    def __call__(self, sample: dict) -> dict:
        position = sample.pop(POSITION, None)
        if self.base_seed is None or position is None:
            out = self.transform(sample)
        else:
            seed = _splitmix64(self.base_seed + position)
            with _rngs_seeded(seed, restore=self.in_main_process):
                out = self.transform(sample)
        out.setdefault("key", sample["key"])
        self.counter.good_sample()
        return out


def collate(samples: list[dict]) -> dict:
    """Samples -> batch: tensors stacked, ints -> int64 [B], floats -> float32 [B], else lists."""
    fields = [name for name in samples[0] if not name.startswith("__")]
    for sample in samples[1:]:
        if [name for name in sample if not name.startswith("__")] != fields:
            raise ValueError(
                f"samples in one batch have different fields: {fields} vs "
                f"{list(sample)}; do the shards mix labelled and unlabelled data?"
            )
    batch = {}
    for name in fields:
        values = [sample[name] for sample in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(first, np.ndarray):
            batch[name] = torch.from_numpy(np.stack(values))
        elif isinstance(first, (bool, int, np.integer)):
            batch[name] = torch.tensor(values, dtype=torch.int64)
        elif isinstance(first, (float, np.floating)):
            batch[name] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[name] = values
    return batch


class _CollateAndFinish:
    """collate, then the sample transform's `finish_batch(batch)` when it has one: work that is
    cheaper once per batch than once per sample (uint8 crops -> normalized float32)."""

    def __init__(self, transform: Callable):
        self.finish = getattr(transform, "finish_batch", None)

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        return self.finish(batch) if self.finish is not None else batch


def _same_fields(samples: Iterator[dict], counter: SkipCounter) -> Iterator[dict]:
    """Drop (and count) samples whose fields differ from the stream's first sample.

    A tar cut at a header boundary ends without an error, and its last sample may lack fields;
    batching it with complete samples would fail.
    """
    fields = None
    for sample in samples:
        these = sorted(sample)
        if fields is None:
            fields = these
        if these == fields:
            yield sample
        else:
            counter(ValueError(f"sample {sample.get('key')} has fields {these}, not {fields}"))


def _with_skip_reports(batches: Iterator[dict], worker: int, counter: SkipCounter):
    """Tag each batch with this worker's running skip count; end with a count-only report."""
    for batch in batches:
        batch["_worker"] = torch.tensor([worker])
        batch["_skipped"] = torch.tensor([counter.total])
        yield batch
    yield {"_worker": torch.tensor([worker]), "_skipped": torch.tensor([counter.total])}


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


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
        for sample in _read_shard(url, counter):
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


class _TrainStream(IterableDataset):
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
        worker, num_workers = _worker_info()
        stream = (worker + self.start_step) % num_workers
        done = _share(self.start_step, num_workers, stream)
        remaining = _share(self.steps_per_epoch, num_workers, stream) - done
        seeds = (self.seed, self.epoch, self.rank, stream)
        counter = SkipCounter(max_in_a_row=MAX_UNREADABLE_IN_A_ROW)

        raw = _resampled_samples(self.urls, random.Random(_mix(*seeds, 0)), counter)
        shuffled = wds.shuffle(
            self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(_mix(*seeds, 1))
        )(raw)
        # Exact skip when the skipped samples all decode; each unreadable one among them would
        # shift the resumed stream by one sample.
        kept = itertools.islice(_numbered(shuffled), done * self.batch_size, None)
        decoded = wds.map(decode_sample, handler=counter)(kept)
        transformed = wds.map(_Transform(self.transform, counter, seeds), handler=counter)(decoded)
        complete = _same_fields(transformed, counter)
        batching = wds.batched(
            self.batch_size, collation_fn=_CollateAndFinish(self.transform), partial=False
        )
        batches = batching(complete)
        yield from _with_skip_reports(itertools.islice(batches, remaining), worker, counter)


# ----------------------------------------------------------------------------------------------
# Evaluation: exact, every sample once


class _EvalStream(IterableDataset):
    """All samples of the given shards (one rank's), split over DataLoader workers by shard."""

    def __init__(self, urls, transform, batch_size):
        super().__init__()
        self.urls = list(urls)
        self.transform = transform
        self.batch_size = batch_size

    def __iter__(self):
        worker, num_workers = _worker_info()
        counter = SkipCounter()
        raw = (
            sample for url in self.urls[worker::num_workers] for sample in _read_shard(url, counter)
        )
        decoded = wds.map(decode_sample, handler=counter)(raw)
        transformed = wds.map(_Transform(self.transform, counter, None), handler=counter)(decoded)
        complete = _same_fields(transformed, counter)
        batching = wds.batched(
            self.batch_size, collation_fn=_CollateAndFinish(self.transform), partial=True
        )
        batches = batching(complete)
        yield from _with_skip_reports(batches, worker, counter)


# ----------------------------------------------------------------------------------------------
# The loader


def _seed_worker(base_seed: int, worker_id: int) -> None:
    seed = _mix(base_seed, worker_id)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class ShardLoader:
    """Iterates batch dicts from a DataLoader over a shard stream; counts what was skipped.

    `skipped`: samples and shard reads skipped on this rank, over all passes so far. Each
    worker reports its running count with every batch and once more when it finishes, so after
    a full pass the count is exact.
    """

    def __init__(
        self, stream: IterableDataset, num_workers: int, seed: int, num_batches: int | None
    ):
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.dataloader = DataLoader(
            stream,
            batch_size=None,  # batches are built inside the workers
            num_workers=num_workers,
            worker_init_fn=functools.partial(_seed_worker, seed),
            generator=generator,
            # page-locked batches make the engine's non_blocking copies to the GPU asynchronous
            pin_memory=torch.cuda.is_available(),
        )
        self.num_batches = num_batches
        self._skipped_in_past_passes = 0
        self._skipped_by_worker: dict[int, int] = {}  # latest running count per worker

    @property
    def skipped(self) -> int:
        return self._skipped_in_past_passes + sum(self._skipped_by_worker.values())

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an evaluation loader does not know its length")
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        self._skipped_in_past_passes = self.skipped
        self._skipped_by_worker = {}
        yielded = 0
        for batch in _worker_errors_as_one_line(self.dataloader):
            worker = int(batch.pop("_worker"))
            self._skipped_by_worker[worker] = int(batch.pop("_skipped"))
            if not batch:  # a worker's final count report
                continue
            if self.num_batches is not None and yielded >= self.num_batches:
                continue  # never more than promised; keep reading the workers' reports
            yielded += 1
            yield batch


def _worker_errors_as_one_line(dataloader: DataLoader) -> Iterator[dict]:
    """A DataError raised in a worker process arrives with the worker's traceback in its
    message; keep only the original one-line message for the user."""
    try:
        yield from dataloader
    except DataError as error:
        text = str(error).rstrip()
        if "Original Traceback" not in text:
            raise
        raise DataError(text.rsplit("DataError: ", 1)[-1]) from None


def _shard_urls(shards: str | os.PathLike | Sequence[str], allow_pipe: bool) -> list[str]:
    """A spec string or Path is expanded and checked by expand_shards; a list (what
    expand_shards returned) is used as it is, so a shard that disappears mid-run is skipped
    when read instead of failing the next epoch's loader."""
    if isinstance(shards, (str, os.PathLike)):
        return expand_shards(shards, allow_pipe=allow_pipe)
    urls = [os.fspath(url) for url in shards]
    if not urls:
        raise DataError("no shards given (the shard list is empty)")
    for url in urls:
        if url.startswith("pipe:") and not allow_pipe:
            _refuse_pipe(url)
    return urls


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
    urls = _shard_urls(shards, allow_pipe)
    stream = _TrainStream(
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
        stream, num_workers, seed=_mix(seed, epoch, rank), num_batches=steps_per_epoch - start_step
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
    rank_urls = _shard_urls(shards, allow_pipe)[rank::world_size]
    stream = _EvalStream(rank_urls, sample_transform, batch_size)
    # Workers beyond the shard count would only start and stop.
    return ShardLoader(stream, min(num_workers, len(rank_urls)), seed=0, num_batches=None)
