"""ShardLoader: a DataLoader over one of the streams (streams.py) that strips the workers'
skip reports and counts what was skipped on this rank.
"""

import functools
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pretrain.data.samples import mix_seeds
from pretrain.errors import DataError


def _seed_worker(base_seed: int, worker_id: int) -> None:
    seed = mix_seeds(base_seed, worker_id)
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
