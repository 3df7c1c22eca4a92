"""Cost of the online kNN monitor (pretrain.monitor) against the training step it interrupts.

    python -m benchmarks.monitor [--config demo] [--rounds 5]

In one process: the engine's training step of the MAE demo config (benchmarks.workloads, batch
from its own transform) and the monitor's evaluation of the same encoder on the demo config's
labelled subset (monitor.samples of the demo val shards), timed in alternating rounds. The
share of training time is one evaluation over `monitor.every` steps; the whole-run share also
counts the evaluation before the first step and the subset's one-time loading.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time

import torch

from benchmarks import workloads
from benchmarks.harness import emit, environment, parser
from benchmarks.measure import time_steps
from pretrain.data import ensure_demo_data
from pretrain.distributed import make_accelerator
from pretrain.monitor import OnlineKnn


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    arguments.add_argument("--steps", type=int, default=5, help="timed steps per round")
    arguments.add_argument("--tiny", action="store_true", help="test sizes (seconds in all)")
    args = arguments.parse_args(argv)
    device = torch.device("cpu")

    config = workloads.load("mae", "demo", tiny=args.tiny)
    data = config.data
    if args.tiny:  # a small demo set of its own, in a temporary folder
        data.demo_dir = tempfile.mkdtemp(prefix="monitor-benchmark-")
        data.demo_train_samples, data.demo_val_samples, config.monitor.samples = 64, 64, 32
    demo = ensure_demo_data(data.demo_dir, data.demo_train_samples, data.demo_val_samples,
                            data.image_size, progress=False)  # fmt: skip
    data.val_shards = demo["val"]
    workload = workloads.build(config, device, batch_size=data.batch_size)
    accelerator = make_accelerator("no", None)
    encoder = workload.objective.encoder
    started = time.perf_counter()
    monitor = OnlineKnn.start(config, accelerator, [], encoder)
    load_s = time.perf_counter() - started
    if args.tiny:  # the subset is in memory now
        shutil.rmtree(data.demo_dir)

    workload.step()  # untimed: allocator, lazy init
    monitor.evaluate(encoder)
    step_times, knn_times = [], []
    for _ in range(args.rounds):
        step_times += time_steps(workload.step, args.steps, device)
        knn_times += time_steps(lambda: monitor.evaluate(encoder), 1, device)
    result = _result(config, step_times, knn_times, load_s, len(monitor.labels))
    result["environment"] = environment(device)
    emit(result, [_row(result)], args.out)
    return 0


def _result(config, step_times, knn_times, load_s: float, samples: int) -> dict:
    step_s = statistics.median(wall for wall, _ in step_times)
    knn_s = statistics.median(wall for wall, _ in knn_times)
    step_cpu = statistics.median(cpu for _, cpu in step_times)
    knn_cpu = statistics.median(cpu for _, cpu in knn_times)
    every, steps = config.monitor.every, config.train.steps
    evaluations = 1 + steps // every + (1 if steps % every else 0)  # before step 1, every, last
    return {
        "benchmark": "monitor",
        "config": "demo_mae",
        "monitor_every": every,
        "train_steps": steps,
        "batch_size": config.data.batch_size,
        "subset_samples": samples,
        "step_s_median": step_s,
        "step_cpu_s_median": step_cpu,
        "knn_s_median": knn_s,
        "knn_cpu_s_median": knn_cpu,
        "subset_load_s": load_s,
        # one evaluation per `every` steps, as a share of those steps' training time
        "share_of_step_time": knn_s / (every * step_s),
        "share_of_step_cpu_time": knn_cpu / (every * step_cpu),
        # the whole demo run: every evaluation and the loading, over train.steps steps
        "share_of_run": (evaluations * knn_s + load_s) / (steps * step_s),
        "evaluations_per_run": evaluations,
        "rounds": len(knn_times),
    }


def _row(result: dict) -> dict:
    return {
        "config": result["config"],
        "every": result["monitor_every"],
        "step_s": round(result["step_s_median"], 3),
        "knn_s": round(result["knn_s_median"], 3),
        "share": f"{100 * result['share_of_step_time']:.1f}%",
        "run share": f"{100 * result['share_of_run']:.1f}%",
    }


if __name__ == "__main__":
    raise SystemExit(main())
