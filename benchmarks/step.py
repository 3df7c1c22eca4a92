"""Training-step throughput, MFU and peak memory of each objective at its demo, CIFAR-10 and paper
configs.

    python -m benchmarks.step [--objectives mae,simclr,clip] [--configs demo,cifar,paper]

MFU = (model FLOPs of one step, counted by FlopCounterMode on the meta device) / (median step
time) / (the fp32 matmul peak measured in this process, before and after the steps; the higher
of the two). For the demo and CIFAR configs, "dense_ops_alone" replays the step's own matmuls and
convolutions (same shapes) without anything else: the MFU the step would reach if norms,
activations, attention kernels and the optimizer cost nothing, i.e. the ceiling that the
model's shapes allow on this machine.
CIFAR and paper configs are counted at their own batch size and timed at --cifar-batch and
--paper-batch images per step; paper configs only when the estimated step time fits
--paper-max-step-s (otherwise the JSON says why not).
"""

from __future__ import annotations

import torch

from benchmarks import workloads
from benchmarks.harness import emit, environment, parser
from benchmarks.measure import PeakMemory, dense_op_replay, matmul_peak, summarize, time_steps

# Paper-sized steps run far below the matmul peak on a CPU; this guess only decides whether
# timing them fits the limit, it is never reported as a measurement.
ASSUMED_FRACTION_OF_PEAK = 0.4


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--objectives", default="mae,simclr,clip")
    arguments.add_argument("--configs", default="demo,cifar,paper")
    arguments.add_argument("--steps", type=int, default=10, help="timed steps per config")
    arguments.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    arguments.add_argument("--cifar-batch", type=int, default=32)
    arguments.add_argument("--cifar-steps", type=int, default=5, help="timed steps, CIFAR configs")
    arguments.add_argument("--paper-batch", type=int, default=2)
    arguments.add_argument("--paper-steps", type=int, default=2, help="timed steps, paper configs")
    arguments.add_argument("--paper-max-step-s", type=float, default=20.0)
    arguments.add_argument("--tiny", action="store_true", help="test sizes (seconds in all)")
    arguments.add_argument("--device", default="cpu")
    args = arguments.parse_args(argv)
    device = torch.device(args.device)

    peak_size, peak_repeats = (512, 3) if args.tiny else (2048, 10)
    peak_before = matmul_peak(device, size=peak_size, repeats=peak_repeats)
    results, rows = [], []
    for objective in args.objectives.split(","):
        for kind in args.configs.split(","):
            result = measure_config(objective, kind, args, device, peak_before["flops_per_s"])
            results.append(result)
            rows.append(_row(result))
    peak_after = matmul_peak(device, size=peak_size, repeats=peak_repeats)
    peak = max(peak_before["flops_per_s"], peak_after["flops_per_s"])
    for result, row in zip(results, rows):
        timed = result.get("timing")
        if timed:
            timed["mfu"] = timed["achieved_flops_per_s"] / peak
            timed["mfu_best_step"] = timed["mfu"] * timed["step_s_median"] / timed["step_s_min"]
            # one thread: CPU time leaves out waits for a core held by other work
            timed["mfu_cpu_time"] = timed["mfu"] * timed["step_s_median"] / timed["cpu_s_median"]
            row["MFU %"] = round(100 * timed["mfu"], 1)
            row["MFU % (CPU time)"] = round(100 * timed["mfu_cpu_time"], 1)
        alone = result.get("dense_ops_alone")
        if alone:
            alone["fraction_of_peak"] = alone["flops_per_s"] / peak
            row["dense ops alone % peak"] = round(100 * alone["fraction_of_peak"], 1)
    emit(
        {
            "benchmark": "step",
            "environment": environment(device),
            "matmul_peak": {"before": peak_before, "after": peak_after, "used_flops_per_s": peak},
            "results": results,
        },
        rows,
        args.out,
    )
    return 0


def measure_config(objective: str, kind: str, args, device, peak_guess: float) -> dict:
    config = workloads.load(objective, kind, tiny=args.tiny and kind == "demo")
    result = {
        "objective": objective,
        "config": kind,
        "config_file": str(workloads.config_path(objective, kind).relative_to(workloads.ROOT)),
        "model": config.model.name,
        "image_size": config.data.image_size,
        "batch_size": config.data.batch_size,
        "flops_per_step": workloads.step_flops(config),
    }
    result["flops_per_image"] = result["flops_per_step"] / config.data.batch_size
    batch = config.data.batch_size
    if kind != "demo" and args.tiny:
        return {**result, "timing": None, "timing_skipped": "--tiny: FLOPs only"}
    if kind == "cifar":
        batch = args.cifar_batch
    elif kind != "demo":
        batch = args.paper_batch
        estimate = workloads.step_flops(config, batch) / (ASSUMED_FRACTION_OF_PEAK * peak_guess)
        if estimate > args.paper_max_step_s:
            result["timing"] = None
            result["timing_skipped"] = (
                f"estimated {estimate:.0f} s per step at batch {batch} on this machine "
                f"(limit --paper-max-step-s {args.paper_max_step_s})"
            )
            return result
    flops_timed = workloads.step_flops(config, batch)
    steps, warmup = {
        "demo": (args.steps, args.warmup),
        "cifar": (args.cifar_steps, 1),
    }.get(kind, (args.paper_steps, 1))
    with PeakMemory(device) as memory:
        workload = workloads.build(config, device, batch_size=batch)
        time_steps(workload.step, warmup, device)
        times = time_steps(workload.step, steps, device)
    timing = summarize(times, workload.images)
    timing["batch_size"] = batch
    timing["images_per_s"] = timing.pop("items_per_s")
    timing["achieved_flops_per_s"] = flops_timed / timing["step_s_median"]
    if batch != config.data.batch_size:
        timing["note"] = f"timed at batch {batch}, not the config's {config.data.batch_size}"
    result["parameters"] = workload.parameters
    result["timing"] = timing
    if kind in ("demo", "cifar"):  # the step's own dense ops alone: the ceiling for its MFU
        result["dense_ops_alone"] = dense_op_replay(workload.forward_backward, device)
    result["memory"] = memory.as_dict()
    return result


def _row(result: dict) -> dict:
    timing = result.get("timing") or {}
    memory = result.get("memory") or {}
    return {
        "objective": result["objective"],
        "config": result["config"],
        "batch": result["batch_size"],
        "GFLOP/img": result["flops_per_image"] / 1e9,
        "timed batch": timing.get("batch_size"),
        "img/s": timing.get("images_per_s"),
        "MFU %": None,
        "MFU % (CPU time)": None,
        "peak RSS MB": memory.get("peak_mb"),
        "added MB": memory.get("added_mb"),
    }


if __name__ == "__main__":
    raise SystemExit(main())
