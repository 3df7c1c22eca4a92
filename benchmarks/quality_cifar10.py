"""Representation quality on CIFAR-10 for a fixed CPU budget per objective.

For each objective: pretrain a CPU-sized model (the demo config of that objective) on the CIFAR-10
train shards for `--minutes` of wall clock (`train.time_limit_minutes`), then a linear probe and a
kNN on the test split, each beside a random-init encoder of the same architecture. Prints one JSON
document (and a markdown table on stderr); `--out` keeps the JSON.

Shards first (docs/data.md): data_cache/cifar10/{train,test}-index.json, and for CLIP the
caption shards data_cache/cifar10_captions/ written with --caption-template "a photo of a {}.".

    python -m benchmarks.quality_cifar10 --minutes 5 --out benchmarks/results/quality_cifar10.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ("data_cache/cifar10/train-index.json", "data_cache/cifar10/test-index.json")
CAPTIONED = (
    "data_cache/cifar10_captions/train-index.json",
    "data_cache/cifar10_captions/test-index.json",
)
# train.steps spans the lr schedule; chosen so that the cosine about ends with a 5-minute budget
# at the step rates measured on this 2-core CPU (the time limit is the hard stop).
OBJECTIVES = {
    "mae": ("configs/pretrain/demo_mae.yaml", PLAIN, 600),
    "simclr": ("configs/pretrain/demo_simclr.yaml", PLAIN, 500),  # + 2 loader workers, below
    "clip": ("configs/pretrain/demo_clip.yaml", CAPTIONED, 500),
    "autoencoder": ("configs/pretrain/demo_autoencoder.yaml", PLAIN, 1200),
    "vae": ("configs/pretrain/demo_vae.yaml", PLAIN, 900),
    "gan": ("configs/pretrain/demo_gan.yaml", PLAIN, 600),
}


def run(command: list[str], log: Path) -> dict:
    """Run a CLI, its progress bars into `log`; returns the JSON of its last stdout line."""
    with open(log, "a") as errors:
        result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}); see {log}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def evaluate(run_dir: Path, train_samples: int, log: Path) -> dict:
    finetune = [sys.executable, "-m", "finetune"]
    common = [
        "--encoder", str(run_dir), "--compare-random-init", "--no-wandb",
        "--train-samples", str(train_samples),
    ]  # fmt: skip
    linear = run([*finetune, "linear", *common, "--epochs", "100"], log)
    knn = run([*finetune, "knn", *common], log)
    return {
        "linear_top1": linear["top1"],
        "linear_top1_random_init": linear["random_init_top1"],
        "knn_top1": knn["top1"],
        "knn_top1_random_init": knn["random_init_top1"],
        "val_samples": linear.get("val_samples"),
        "train_samples": linear.get("train_samples"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="pretraining budget each")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--train-samples", type=int, default=10000, help="probe training images")
    parser.add_argument("--output-dir", default="runs/quality-cifar10")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.objectives.split(",") if name.strip()]
    unknown = sorted(set(names) - set(OBJECTIVES))
    if unknown:
        parser.error(f"unknown objectives: {', '.join(unknown)}")
    for name in names:
        for shards in OBJECTIVES[name][1]:
            if not (ROOT / shards).is_file():
                parser.error(
                    f"missing {shards}: write the CIFAR-10 shards first (see the docstring)"
                )

    output_dir = ROOT / args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / "progress.log"
    rows = []
    for name in names:
        config, (train, test), steps = OBJECTIVES[name]
        run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        started = time.perf_counter()
        summary = run(
            [
                sys.executable, "-m", "pretrain", "--config", config,
                f"data.train_shards={train}", f"data.val_shards={test}",
                f"train.steps={steps}", f"train.time_limit_minutes={args.minutes}",
                f"train.checkpoint_every={steps}", f"train.output_dir={args.output_dir}",
                f"train.run_name={run_name}", "logging.wandb=false", "logging.image_every=0",
                # two views of colour-jittered crops: one loader worker cannot keep up
                *(["data.num_workers=2"] if name == "simclr" else []),
            ],
            log,
        )  # fmt: skip
        pretrain_s = time.perf_counter() - started
        scores = evaluate(output_dir / run_name, args.train_samples, log)
        rows.append(
            {
                "objective": name,
                "config": config,
                "steps_done": summary["steps"],
                "steps_planned": steps,
                "pretrain_wall_s": round(pretrain_s, 1),
                "final_loss": summary.get("final_loss"),
                **scores,
                "run_dir": str(Path(args.output_dir) / run_name),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    document = {
        "benchmark": "quality_cifar10",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}",
        "budget_minutes": args.minutes,
        "command": "python -m benchmarks.quality_cifar10 " + " ".join(argv or sys.argv[1:]),
        "rows": rows,
    }
    text = json.dumps(document, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(
        "\n| objective | steps | linear top-1 (random init) | kNN top-1 (random init) |\n"
        "|---|---|---|---|",
        file=sys.stderr,
    )
    for row in rows:
        print(
            f"| {row['objective']} | {row['steps_done']} | {row['linear_top1']:.3f} "
            f"({row['linear_top1_random_init']:.3f}) | {row['knn_top1']:.3f} "
            f"({row['knn_top1_random_init']:.3f}) |",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
