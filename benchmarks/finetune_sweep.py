"""A measured sweep of full-finetuning settings: every point on the same budget, one after another.

Each point is `finetune full` on one encoder with one finetune config plus that point's
`section.key=value` overrides (a point prefixed `random:` runs on a random-init encoder of the
same architecture instead). The budget (epochs, train samples, batch) comes from the config and
is the same for every point unless a point overrides it; the JSON records it per row, with the
first epoch's training loss against the chance level ln(classes), top-1 after the last epoch,
the best epoch's top-1 and the wall time. Points run one after another in subprocesses (parallel
runs on a small CPU only slow each other down).

    python -m benchmarks.finetune_sweep --encoder runs/demo --config configs/finetune/demo.yaml \\
        --point "full.blr=1e-3" --point "full.blr=1e-2" --point "random:full.blr=1e-2" \\
        --out benchmarks/results/finetune_sweep_demo.json
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import ROOT, emit, environment, fail, parser

RANDOM = "random:"


def run_point(encoder: str, config: str, point: str, output: Path, extra: list[str]) -> dict:
    """One `finetune full` run in a subprocess; its result JSON plus the point's description."""
    random_init = point.startswith(RANDOM)
    overrides = shlex.split(point[len(RANDOM) :] if random_init else point)
    command = [
        sys.executable, "-m", "finetune", "full", "--encoder", encoder, "--config", config,
        "--output", str(output), "--no-wandb", *(["--random-init"] if random_init else []),
        *extra, *overrides,
    ]  # fmt: skip
    started = time.perf_counter()
    with open(output.with_suffix(".log"), "w") as log:
        finished = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    if finished.returncode != 0:
        return {"point": point, "error": f"exit {finished.returncode}, see {log.name}"}
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    first = result["history"][0]
    classes = len(result["per_class_top1"])
    return {
        "point": point,
        "random_init": random_init,
        "top1": result["top1"],
        "best_top1": result["best_top1"],
        "epoch1_train_loss": round(first["train_loss"], 4),
        "epoch1_loss_over_chance": round(first["train_loss"] / math.log(classes), 4),
        # the last quarter of epoch 1: what the chance-level warning reads
        "epoch1_end_loss_over_chance": round(
            first.get("train_loss_end", math.nan) / math.log(classes), 4
        ),
        "final_train_loss": round(result["history"][-1]["train_loss"], 4),
        "lr": result["lr"],
        "epochs": result["epochs"],
        "steps_per_epoch": result["steps_per_epoch"],
        "global_batch": result["global_batch"],
        "train_samples": result["train_samples"],
        "val_samples": result["val_samples"],
        "warnings": result.get("warnings", []),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--encoder", required=True, help="pretraining run or export")
    arguments.add_argument("--config", required=True, help="the finetune config every point uses")
    arguments.add_argument(
        "--point", action="append", default=[], help="overrides of one point ('random:' prefix)"
    )
    arguments.add_argument("--extra", default="", help="arguments for every point")
    arguments.add_argument("--work-dir", help="folder for the points (default: temp)")
    args = arguments.parse_args(argv)
    if not args.point:
        fail("give at least one --point")
    if not (ROOT / args.config).is_file() and not Path(args.config).is_file():
        fail(f"no finetune config {args.config}")
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="finetune-sweep-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, point in enumerate(args.point):
        output = work_dir / f"point{number:02d}"
        row = run_point(args.encoder, args.config, point, output, shlex.split(args.extra))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    document = {
        "benchmark": "finetune_sweep",
        **environment("cpu"),
        "threads_env": os.environ.get("OMP_NUM_THREADS"),
        "encoder": args.encoder,
        "config": args.config,
        "rows": rows,
    }
    table = [
        {
            "point": row["point"],
            "epoch1/lnC": row.get("epoch1_loss_over_chance"),
            "end1/lnC": row.get("epoch1_end_loss_over_chance"),
            "top1": row.get("top1"),
            "best": row.get("best_top1"),
            "wall_s": row.get("wall_s"),
            "error": row.get("error"),
        }
        for row in rows
    ]
    emit(document, table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
