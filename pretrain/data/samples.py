"""Per-sample stages of every stream: read a shard, decode, seeded transform, collate, count
what was skipped.

Unreadable data never stops a loop: a truncated tar, a corrupt image or a failing transform is
skipped and counted by a SkipCounter (a webdataset error handler). Counts live in the worker
processes, so every batch carries its worker's running count (private fields "_worker",
"_skipped") and each worker ends with a count-only report; the ShardLoader (loader.py) strips
these and exposes the rank's total.

Seeding: a training sample's transform runs with the python, numpy and torch RNGs seeded from
(seed, epoch, rank, stream, position), so its augmentation never depends on what was skipped
or resumed before it.
"""

import contextlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from pretrain.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
POSITION = "__position__"  # a training sample's index in its stream; seeds its transform
LOGGED_ERRORS_PER_WORKER = 3


class UnreadableSample(ValueError):
    """A sample that cannot be used; the message names its shard and key."""


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
            what = "" if isinstance(error, UnreadableSample) else f"{type(error).__name__}: "
            logger.warning(f"skipped unreadable data: {what}{str(error)[:300]}")
        if self.max_in_a_row is not None and self.in_a_row > self.max_in_a_row:
            raise DataError(f"{self.in_a_row} unreadable samples in a row; last: {error}")
        return True

    def good_sample(self) -> None:
        self.in_a_row = 0


def read_shard(url: str, counter: SkipCounter) -> Iterator[dict]:
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


def peek_fields(urls: list[str]) -> set[str] | None:
    """The fields of the first readable sample of these shards ({"jpg", "cls", "txt"}), read
    without decoding it; None when no shard yields one. A cheap look before a long pass (does
    this set carry labels?): shards of one set hold the same fields."""
    for url in urls:
        for raw in read_shard(url, SkipCounter()):
            return {name for name in raw if not name.startswith("__")}
    return None


def require_fields(urls: list[str], needs: Sequence[str], user: str) -> None:
    """One line before a long pass when the shards' first sample lacks a field `user` (e.g.
    "objective clip") needs in every sample, instead of every sample being skipped."""
    fields = peek_fields(urls) if needs else None
    missing = [name for name in needs if fields is not None and name not in fields]
    if missing:
        raise DataError(
            f"{user} needs {', '.join(missing)} in every sample, and the shards ({urls[0]} ...) "
            f"have none (their fields: {', '.join(sorted(fields))})"
        )


def decode_sample(raw: dict) -> dict:
    """Raw sample -> {"image": PIL RGB image, "key": str, "label": int?, "caption": str?,
    "captions": list[str]?}.

    `captions` holds every caption of the image (a `json` field's {"captions": [...]}, else the
    one `txt`), `caption` the first. Other fields (img2dataset's `json` metadata, ...) are left
    alone. A sample that cannot be decoded raises UnreadableSample naming its shard and key.
    """
    key, url = raw.get("__key__"), raw.get("__url__", "?")
    field = next((name for name in IMAGE_FIELDS if name in raw), None)
    if field is None:
        fields = sorted(name for name in raw if not name.startswith("__"))
        raise UnreadableSample(f"{url}: sample {key} has no image field (has {fields})")
    try:
        with Image.open(io.BytesIO(raw[field])) as encoded:
            image = encoded.convert("RGB")  # decodes every pixel: a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        # Pillow names the in-memory buffer (<_io.BytesIO object at 0x...>), not the sample.
        reason = (
            "not an image format Pillow reads"
            if isinstance(error, UnidentifiedImageError)
            else str(error)
        )
        raise UnreadableSample(f"{url}: sample {key}: {field} image: {reason}") from None
    return {"image": image, **decode_caption_sample(raw)}


def decode_caption_sample(raw: dict) -> dict:
    """Raw sample -> {"key": str, "label": int?, "caption": str?, "captions": list[str]?}: the
    image bytes stay undecoded (text-only transforms, e.g. masked language modelling)."""
    sample = {"key": raw["__key__"]}
    if "cls" in raw:
        sample["label"] = int(raw["cls"])
    captions = _captions(raw)
    if captions:
        sample["caption"], sample["captions"] = captions[0], captions
    if POSITION in raw:
        sample[POSITION] = raw[POSITION]
    return sample


def decoder_for(transform: Callable) -> Callable[[dict], dict]:
    """decode_sample, or decode_caption_sample for a transform that sets needs_image = False."""
    return decode_sample if getattr(transform, "needs_image", True) else decode_caption_sample


def _captions(raw: dict) -> list[str] | None:
    """All captions of a raw sample: `json` {"captions": [...]} (written for images with several
    captions), else the `txt` caption, else None."""
    metadata = raw.get("json")
    if metadata is not None and b'"captions"' in metadata:  # parse only what may hold them
        try:
            listed = json.loads(metadata).get("captions")
        except (ValueError, AttributeError):
            listed = None
        if isinstance(listed, list) and listed and all(isinstance(t, str) for t in listed):
            return listed
    if "txt" in raw:
        return [raw["txt"].decode("utf-8")]
    return None


def mix_seeds(*numbers: int) -> int:
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


class SeededTransform:
    """Runs the sample transform; in training with RNGs seeded by the sample's position.

    Seeding per sample makes a sample's augmentation a function of (seed, epoch, rank, stream,
    position) alone, so a resumed run that skips samples without transforming them still
    gives every later sample the same crop as an uninterrupted run.
    """

    def __init__(self, transform: Callable, counter: SkipCounter, seed_parts: tuple | None):
        self.transform = transform
        self.counter = counter
        self.base_seed = mix_seeds(*seed_parts) if seed_parts is not None else None
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


class CollateAndFinish:
    """collate, then the sample transform's `finish_batch(batch)` when it has one: work that is
    cheaper once per batch than once per sample (uint8 crops -> normalized float32)."""

    def __init__(self, transform: Callable):
        self.finish = getattr(transform, "finish_batch", None)

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate(samples)
        return self.finish(batch) if self.finish is not None else batch


def same_fields(samples: Iterator[dict], counter: SkipCounter) -> Iterator[dict]:
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


def with_skip_reports(batches: Iterator[dict], worker: int, counter: SkipCounter):
    """Tag each batch with this worker's running skip count; end with a count-only report."""
    for batch in batches:
        batch["_worker"] = torch.tensor([worker])
        batch["_skipped"] = torch.tensor([counter.total])
        yield batch
    yield {"_worker": torch.tensor([worker]), "_skipped": torch.tensor([counter.total])}


def worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)
