"""Data loader throughput on JPEG shards (decode + transform, img/s per worker) against the rate
at which the same objective's training step consumes images, both measured in this process.

    python -m benchmarks.loader [--shards data_cache/cifar10/train-index.json] [--workers 1,2]

The loader is pretrain.data.train_loader exactly as the engine builds it (resampled shards,
shuffle buffer, per-sample seeded transform, batching in the workers). Its rate is counted from
the first batch on, so worker start-up and the shuffle buffer's first fill are reported apart.
A per-stage split (tar read, JPEG decode, transform, collate; one process, no workers) shows
where a worker's time goes; what the four stages leave unexplained is the reader's own cost.

CIFAR-10 shards: unpack ../shared/data/cifar10_jpg.tar.gz into data_cache/cifar10_jpg, then
`pretrain shards imagefolder data_cache/cifar10_jpg/train data_cache/cifar10 --prefix train`.
"""

from __future__ import annotations

import itertools
import os
import time

import torch
import webdataset as wds

from benchmarks import workloads
from benchmarks.harness import ROOT, emit, environment, fail, parser
from benchmarks.measure import summarize, time_steps
from pretrain.data import DataError, collate, decode_sample, expand_shards, train_loader
from pretrain.objectives import get_objective

DEFAULT_SHARDS = ROOT / "data_cache" / "cifar10" / "train-index.json"


def loader_rate(urls, transform, batch_size: int, batches: int, workers: int, buffer: int) -> dict:
    """Images per second from pretrain.data.train_loader after its first batch, and the CPU time
    its worker processes spent per image (start-up and the shuffle buffer's fill included):
    unlike the wall-clock rate, that does not depend on what else the machine is running."""
    loader = train_loader(
        urls,
        transform,
        batch_size=batch_size,
        steps_per_epoch=batches,
        epoch=0,
        seed=0,
        rank=0,
        world_size=1,
        num_workers=workers,
        shuffle_buffer=buffer,
    )
    children_before = _children_cpu_s()
    started = time.perf_counter()
    first_batch_at, images, all_images = None, 0, 0
    for batch in loader:
        all_images += batch["image"].shape[0]
        if first_batch_at is None:
            first_batch_at = time.perf_counter()
            continue
        images += batch["image"].shape[0]
    elapsed = time.perf_counter() - first_batch_at
    worker_cpu_s = _children_cpu_s() - children_before  # workers have exited and been joined
    rate = images / elapsed
    measured = {
        "workers": workers,
        "startup_s": first_batch_at - started,
        "images_timed": images,
        "images_per_s": rate,
        "images_per_s_per_worker": rate / max(workers, 1),
    }
    if workers:
        measured["worker_cpu_us_per_image"] = 1e6 * worker_cpu_s / all_images
    return measured


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished, joined child processes (the loader workers)."""
    times = os.times()
    return times.children_user + times.children_system


def stage_split(urls, transform, samples: int) -> dict:
    """Microseconds per image in each stage, run one after another in this process (after a
    few untimed samples: the first JPEG decode and transform pay one-time set-up costs)."""
    started = time.perf_counter()
    raw = list(itertools.islice(wds.tarfile_samples([{"url": url} for url in urls]), samples))
    read_s = time.perf_counter() - started
    collate([transform(decode_sample(sample)) for sample in raw[:8]])
    started = time.perf_counter()
    decoded = [decode_sample(sample) for sample in raw]
    decode_s = time.perf_counter() - started
    started = time.perf_counter()
    transformed = [transform(sample) for sample in decoded]
    transform_s = time.perf_counter() - started
    started = time.perf_counter()
    collate(transformed)
    collate_s = time.perf_counter() - started
    count = len(raw)
    return {
        "samples": count,
        "us_per_image": {
            "tar_read": 1e6 * read_s / count,
            "jpeg_decode": 1e6 * decode_s / count,
            "transform": 1e6 * transform_s / count,
            "collate": 1e6 * collate_s / count,
        },
    }


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--shards", default=str(DEFAULT_SHARDS))
    arguments.add_argument("--objectives", default="mae,simclr,clip")
    arguments.add_argument("--workers", default="1,2", help="loader worker counts to measure")
    arguments.add_argument("--batches", type=int, default=48, help="batches per loader run")
    arguments.add_argument("--stage-samples", type=int, default=512)
    arguments.add_argument(
        "--steps", type=int, default=8, help="timed training steps, before and after the loader"
    )
    arguments.add_argument("--tiny", action="store_true", help="test sizes (seconds in all)")
    args = arguments.parse_args(argv)
    device = torch.device("cpu")
    try:
        urls = expand_shards(args.shards)
    except DataError as error:
        fail(f"{error} (make CIFAR-10 shards as benchmarks/README.md says, or pass --shards)")

    results, rows = [], []
    for objective in args.objectives.split(","):
        config = workloads.load(objective, "demo", tiny=args.tiny)
        transform = get_objective(objective).train_transform(config)
        batch_size = config.data.batch_size
        try:
            stages = stage_split(urls, transform, args.stage_samples)
        except ValueError as error:  # e.g. CLIP on shards without captions
            results.append({"objective": objective, "skipped": f"{error}"})
            continue
        # The step is timed before and after the loader runs and the faster of the two is kept:
        # on a shared machine the rate drifts by tens of percent, and the faster consumption
        # is the harder bar for the loader.
        workload = workloads.build(config, device)
        time_steps(workload.step, 1, device)
        step_before = summarize(time_steps(workload.step, args.steps, device), batch_size)
        loaders = [
            loader_rate(
                urls, transform, batch_size, args.batches, int(w), config.data.shuffle_buffer
            )
            for w in args.workers.split(",")
        ]
        step_after = summarize(time_steps(workload.step, args.steps, device), batch_size)
        consumption = max(step_before, step_after, key=lambda timing: timing["items_per_s"])
        consumed = consumption["items_per_s"]
        train_cpu_us = 1e6 / consumption["items_per_cpu_s"]  # per image, one training process
        for measured in loaders:
            measured["times_training_consumption"] = measured["images_per_s"] / consumed
            if "worker_cpu_us_per_image" in measured:
                # each worker on a core of its own vs a training process on a core of its own
                measured["times_training_consumption_cpu_time"] = (
                    measured["workers"] * train_cpu_us / measured["worker_cpu_us_per_image"]
                )
        stage_total = sum(stages["us_per_image"].values())
        one_worker = next((m for m in loaders if m["workers"] == 1), None)
        if one_worker is not None:
            stages["unexplained_us_per_image"] = 1e6 / one_worker["images_per_s"] - stage_total
        results.append(
            {
                "objective": objective,
                "config": str(workloads.config_path(objective, "demo").relative_to(ROOT)),
                "batch_size": batch_size,
                "config_num_workers": config.data.num_workers,
                "training_images_per_s": consumed,
                "training_step": consumption,
                "training_images_per_s_before_after": [
                    step_before["items_per_s"],
                    step_after["items_per_s"],
                ],
                "loader": loaders,
                "stages": stages,
            }
        )
        for measured in loaders:
            rows.append(
                {
                    "objective": objective,
                    "workers": measured["workers"],
                    "loader img/s": measured["images_per_s"],
                    "per worker": measured["images_per_s_per_worker"],
                    "train img/s": consumed,
                    "loader / train": measured["times_training_consumption"],
                    "worker CPU us/img": measured.get("worker_cpu_us_per_image"),
                    "train CPU us/img": train_cpu_us,
                    "loader / train (CPU time)": measured.get(
                        "times_training_consumption_cpu_time"
                    ),
                    "startup s": measured["startup_s"],
                }
            )
    emit(
        {
            "benchmark": "loader",
            "environment": environment(device),
            "shards": args.shards,
            "results": results,
        },
        rows,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
