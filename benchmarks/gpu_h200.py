"""GPU throughput and MFU: MAE ViT-B/16 at 224 px and SimCLR ResNet-50 at 224 px, bf16 autocast,
eager and torch.compile, in one call of under 8 minutes (written for one H200).

    python -m benchmarks.gpu_h200 [--parts mae,simclr] [--budget-s 420] [--out results.json]
    python -m benchmarks.gpu_h200 --tiny --no-compile     # CPU dry run of the same path

Per part, on synthetic batches (the objective's own transform; data loading is not measured):
  eager      bf16 autocast, fused AdamW (pretrain.optim on CUDA), no host sync in the step
  eager_sync the same plus the engine's per-step finite check, which makes the host wait
  nhwc       ResNet only: eager with channels_last weights and inputs
  compiled   torch.compile(objective); the first step (compilation) is timed apart
MFU = model FLOPs per step (FlopCounterMode, meta device) / median step time / the bf16 matmul
peak measured at the start of the same run. Memory: torch.cuda.max_memory_allocated per variant.
Each variant is skipped, with the reason in the JSON, when the time left cannot cover it.
With $OUT set (the device runner's output folder) the JSON is also written to $OUT/gpu_h200.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks import workloads
from benchmarks.harness import emit, environment, parser
from benchmarks.measure import PeakMemory, matmul_peak, summarize, synchronize, time_steps

PARTS = {"mae": ("mae", 256), "simclr": ("simclr", 256)}  # part -> (objective, batch per step)
# CPU dry run: the same code path on models small enough for seconds.
TINY_OVERRIDES = {
    "mae": [
        "data.image_size=32",
        "model.name=vit_tiny_patch16_224",
        "model.patch_size=8",
        "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    ],
    "simclr": ["data.image_size=32", "model.name=resnet18"],
}
# Rough seconds each variant needs besides its steps (builds, warmup); compilation of ViT-B or
# ResNet-50 forward + backward takes one to two minutes.
SETUP_S = {"eager": 20.0, "eager_sync": 5.0, "nhwc": 20.0, "compiled": 150.0}


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def run_part(part: str, args, device, peak: float, budget: Budget) -> dict:
    objective, batch_size = PARTS[part]
    overrides = TINY_OVERRIDES[part] if args.tiny else []
    config = workloads.load(objective, "paper", overrides, tiny=args.tiny)
    batch_size = 4 if args.tiny else batch_size
    precision = "bf16" if device.type == "cuda" else "no"  # bf16 on this CPU is ~100x slower
    flops = workloads.step_flops(config, batch_size)
    result = {
        "objective": objective,
        "config_file": str(workloads.config_path(objective, "paper").relative_to(workloads.ROOT)),
        "model": config.model.name,
        "image_size": config.data.image_size,
        "batch_size": batch_size,
        "mixed_precision": precision,
        "flops_per_step": flops,
        "variants": {},
    }
    variants = ["eager", "eager_sync"]
    if part == "simclr":
        variants.append("nhwc")
    if args.compile:
        variants.append("compiled")
    step_estimate = None
    for variant in variants:
        need = SETUP_S[variant] + (step_estimate or 1.0) * args.steps
        if budget.left() < need:
            result["variants"][variant] = {
                "skipped": f"{budget.left():.0f} s left, needs ~{need:.0f}"
            }
            continue
        measured = measure_variant(variant, config, batch_size, precision, args, device)
        timing = measured["timing"]
        timing["achieved_flops_per_s"] = flops / timing["step_s_median"]
        timing["mfu"] = timing["achieved_flops_per_s"] / peak
        step_estimate = step_estimate or timing["step_s_median"]
        result["variants"][variant] = measured
    return result


def measure_variant(variant: str, config, batch_size: int, precision: str, args, device) -> dict:
    with PeakMemory(device) as memory:
        workload = workloads.build(
            config,
            device,
            batch_size=batch_size,
            mixed_precision=precision,
            host_sync=variant == "eager_sync",
        )
        if variant == "nhwc":
            workload.objective.to(memory_format=torch.channels_last)
            for key in ("image", "image2"):
                workload.batch[key] = workload.batch[key].contiguous(
                    memory_format=torch.channels_last
                )
        measured = {}
        if variant == "compiled":
            workload.objective = torch.compile(workload.objective)
            started = time.perf_counter()
            workload.step()
            synchronize(device)
            measured["compile_s"] = time.perf_counter() - started
        time_steps(workload.step, args.warmup, device)
        times = time_steps(workload.step, args.steps, device)
    measured["timing"] = summarize(times, workload.images)
    measured["timing"]["images_per_s"] = measured["timing"].pop("items_per_s")
    measured["memory"] = memory.as_dict()
    del workload
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return measured


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--parts", default="mae,simclr")
    arguments.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    arguments.add_argument("--warmup", type=int, default=3)
    arguments.add_argument("--budget-s", type=float, default=420.0, help="stop starting variants")
    arguments.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    arguments.add_argument("--tiny", action="store_true", help="CPU dry run at test sizes")
    args = arguments.parse_args(argv)
    budget = Budget(args.budget_s)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast
        torch.backends.cudnn.benchmark = True
        peak = matmul_peak(device, torch.bfloat16, size=8192, repeats=10)
    else:
        peak = matmul_peak(device, torch.float32, size=512 if args.tiny else 2048)

    results, rows = [], []
    for part in args.parts.split(","):
        result = run_part(part, args, device, peak["flops_per_s"], budget)
        results.append(result)
        for variant, measured in result["variants"].items():
            timing = measured.get("timing") or {}
            rows.append(
                {
                    "part": part,
                    "variant": variant,
                    "img/s": timing.get("images_per_s"),
                    "MFU %": 100 * timing["mfu"] if timing else None,
                    "peak MB": (measured.get("memory") or {}).get("peak_mb"),
                    "compile s": measured.get("compile_s"),
                    "skipped": measured.get("skipped"),
                }
            )
    out = args.out
    if out is None and os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_h200.json"
    emit(
        {
            "benchmark": "gpu_h200",
            "environment": environment(device),
            "matmul_peak": peak,
            "budget_left_s": round(budget.left(), 1),
            "results": results,
        },
        rows,
        out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
