"""What FSDP saves: the parameter and optimizer-state bytes each process holds, for an MAE
objective (encoder + decoder, AdamW) unsharded on one process and sharded over several.

    python -m benchmarks.fsdp_memory [--model vit_large_patch16_224] [--processes 2]

Each case is its own torchrun launch of this module (`--worker`) on gloo CPU processes: build
the objective as the engine does, shard it with pretrain.sharding.prepare (train.fsdp) when
there is more than one process, take one optimizer step on a synthetic batch (AdamW creates its
state there), then count the bytes of the tensors each process holds (its local shards when
sharded: pretrain.sharding.local_bytes) and its resident-set high-water mark. Image size and
batch are small: they change activations, not what is counted here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import ROOT, emit, environment, parser


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--model", default="vit_large_patch16_224")
    arguments.add_argument("--image-size", type=int, default=32)
    arguments.add_argument("--patch-size", type=int, default=16)
    arguments.add_argument("--processes", type=int, default=2)
    arguments.add_argument("--tiny", action="store_true", help="test size: a 2-block ViT")
    arguments.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one launch's output
    args = arguments.parse_args(argv)
    settings = _settings(args)
    if args.worker is not None:
        return _worker(args.worker, settings)
    cases = {}
    same = [f"--model={args.model}", f"--image-size={args.image_size}",
            f"--patch-size={args.patch_size}", *(["--tiny"] if args.tiny else [])]  # fmt: skip
    for processes in (1, args.processes):
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "case.json"
            _launch(processes, [*same, f"--worker={out}"])
            cases[processes] = json.loads(out.read_text())
    (unsharded,) = cases[1]["per_rank"]
    total = unsharded["parameters"] + unsharded["optimizer"]
    rows = [
        {"processes": w, "rank": rank, "parameter_mb": held["parameters"] / 2**20,
         "optimizer_mb": held["optimizer"] / 2**20,
         "share_of_unsharded": (held["parameters"] + held["optimizer"]) / total,
         "peak_rss_mb": held["peak_rss_mb"]}
        for w, case in cases.items() for rank, held in enumerate(case["per_rank"])
    ]  # fmt: skip
    result = {
        "benchmark": "fsdp_memory",
        "environment": environment(torch.device("cpu")),
        "settings": settings,
        "parameters": cases[1]["parameters"],
        "cases": {str(w): case["per_rank"] for w, case in cases.items()},
        "rows": rows,
    }
    emit(result, rows, args.out)
    return 0


def _settings(args) -> list[str]:
    """The MAE paper's decoder (512 x 8) around the encoder; at --tiny both are tiny."""
    kwargs = "{depth: 2, embed_dim: 64, num_heads: 2}" if args.tiny else "{}"
    decoder = (32, 1, 2) if args.tiny else (512, 8, 16)
    return [
        f"model.name={args.model}", f"model.kwargs={kwargs}", f"data.image_size={args.image_size}",
        f"model.patch_size={args.patch_size}", f"mae.decoder_dim={decoder[0]}",
        f"mae.decoder_depth={decoder[1]}", f"mae.decoder_heads={decoder[2]}",
    ]  # fmt: skip


def _launch(processes: int, worker_arguments: list[str]) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "benchmarks.fsdp_memory", *worker_arguments,
    ]  # fmt: skip
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{processes}-process launch failed:\n{result.stderr[-3000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(out: Path, settings: list[str]) -> int:
    from pretrain import sharding
    from pretrain.config import load_config
    from pretrain.distributed import gather_objects, make_accelerator
    from pretrain.objectives import build_objective
    from pretrain.optim import build_optimizer, no_weight_decay_names, optimizer_phases
    from pretrain.step import optimizer_step

    accelerator = make_accelerator("no", None)
    config = load_config(None, settings)
    torch.manual_seed(0)
    objective, _ = build_objective(config)
    parameters = sum(p.numel() for p in objective.parameters())
    phases = optimizer_phases(objective)
    skip_decay = no_weight_decay_names(objective)
    optimizers = [build_optimizer(phases["main"], skip_decay, config.optimizer, 1e-4)]
    model, optimizers, phases = sharding.prepare(accelerator, objective, optimizers, phases, True)
    size = config.data.image_size
    batch = {"image": torch.randn(2, 3, size, size)}
    optimizer_step(accelerator, model, phases, optimizers, [batch], lambda b, _: model(b), 1e-4)
    held = {**sharding.local_bytes(objective, optimizers), "peak_rss_mb": _peak_rss_mb()}
    per_rank = gather_objects(accelerator, held)
    if accelerator.is_main_process:
        out.write_text(json.dumps({"parameters": parameters, "per_rank": per_rank}))
    accelerator.wait_for_everyone()
    return 0


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


if __name__ == "__main__":
    sys.exit(main())
