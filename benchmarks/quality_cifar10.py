"""Representation quality on CIFAR-10 for a fixed CPU budget per objective.

For each objective: pretrain a CPU-sized model (the demo config of that objective) on the CIFAR-10
train shards for `--minutes` of wall clock (`train.time_limit_minutes`), then on the test split:
a linear probe and a kNN of the frozen encoder, and a full finetune of the encoder end to end
(`configs/finetune/cifar10.yaml`, the recipe found by benchmarks.finetune_sweep), each beside a
random-init encoder of the same architecture on the same budget. Prints one JSON document (and a
markdown table on stderr); `--out` keeps the JSON.

Shards first (docs/data.md): data_cache/cifar10/{train,test}-index.json, and for CLIP the
caption shards data_cache/cifar10_captions/ written with --caption-template "a photo of a {}.".

    python -m benchmarks.quality_cifar10 --minutes 5 --out benchmarks/results/quality_cifar10.json
    python -m benchmarks.quality_cifar10 --objectives mae --reuse mae=runs/quality-cifar10/mae-X
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

from benchmarks.harness import ROOT, run_cli

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


def evaluate(run_dir: Path, args, log: Path) -> dict:
    """Linear probe, kNN and (unless --no-full) full finetuning of the run's encoder, each with
    its random-init baseline. The linear probe writes RUN_DIR/eval/linear.json first, so the
    full finetune's result carries it (linear_probe_top1) as a check."""
    finetune = [sys.executable, "-m", "finetune"]
    common = ["--encoder", str(run_dir), "--compare-random-init", "--no-wandb"]
    if args.train:  # other shards than CIFAR-10 (tests): also over the finetune config's
        common += ["--train", args.train, "--val", args.test]
    sampled = [*common, "--train-samples", str(args.train_samples)]
    linear = run_cli([*finetune, "linear", *sampled, "--epochs", "100"], log)
    knn = run_cli([*finetune, "knn", *sampled], log)
    scores = {
        "linear_top1": linear["top1"],
        "linear_top1_random_init": linear["random_init_top1"],
        "knn_top1": knn["top1"],
        "knn_top1_random_init": knn["random_init_top1"],
        "val_samples": linear.get("val_samples"),
        "train_samples": linear.get("train_samples"),
    }
    if args.no_full:
        return scores
    started = time.perf_counter()
    full = run_cli(
        [*finetune, "full", *common, "--config", args.finetune_config, *args.full_overrides], log
    )
    return {
        **scores,
        "full_top1": full["top1"],
        "full_top1_random_init": full["random_init_top1"],
        "full_linear_probe_top1": full.get("linear_probe_top1"),
        "full_warnings": full.get("warnings", []),
        "full_warnings_random_init": full["random_init_warnings"],
        "full_budget": {
            "config": args.finetune_config,
            "overrides": args.full_overrides,
            "epochs": full["epochs"],
            "steps_per_epoch": full["steps_per_epoch"],
            "global_batch": full["global_batch"],
            "train_samples": full["train_samples"],
            "lr": full["lr"],
        },
        "full_wall_s": round(time.perf_counter() - started, 1),  # pretrained + random init
    }


def pretrain(name: str, args, log: Path) -> tuple[Path, dict]:
    """Pretrain `name` for the budget (or take the run that --reuse names): (run dir, facts)."""
    config, (train, test), steps = OBJECTIVES[name]
    steps = args.steps or steps
    if name in args.reuse:
        run_dir = Path(args.reuse[name])
        summary = json.loads((ROOT / run_dir / "summary.json").read_text())
        return run_dir, {"steps_done": summary["steps"], "pretrain_wall_s": None,
                         "final_loss": summary.get("final_loss"), "reused": True}  # fmt: skip
    run_name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    summary = run_cli(
        [
            sys.executable, "-m", "pretrain", "--config", config,
            f"data.train_shards={args.train or train}", f"data.val_shards={args.test or test}",
            f"train.steps={steps}", f"train.time_limit_minutes={args.minutes}",
            f"train.checkpoint_every={steps}", f"train.output_dir={args.output_dir}",
            f"train.run_name={run_name}", "logging.wandb=false", "logging.image_every=0",
            # two views of colour-jittered crops: one loader worker cannot keep up
            *(["data.num_workers=2"] if name == "simclr" else []),
            *args.pretrain_overrides,
        ],
        log,
    )  # fmt: skip
    facts = {
        "steps_done": summary["steps"],
        "pretrain_wall_s": round(time.perf_counter() - started, 1),
        "final_loss": summary.get("final_loss"),
    }
    return Path(args.output_dir) / run_name, facts


def parse_arguments(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="pretraining budget each")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--train-samples", type=int, default=10000, help="probe training images")
    parser.add_argument("--finetune-config", default="configs/finetune/cifar10.yaml")
    parser.add_argument("--no-full", action="store_true", help="probes only, no full finetune")
    parser.add_argument(
        "--reuse", action="append", default=[], metavar="OBJECTIVE=RUN_DIR",
        help="evaluate this earlier pretraining run instead of pretraining again",
    )  # fmt: skip
    parser.add_argument("--output-dir", default="runs/quality-cifar10")
    parser.add_argument("--out", help="also write the JSON here")
    # For tests on other shards at toy size: shards, planned steps, extra overrides.
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--test", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pretrain-override", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--full-override", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.names = [name.strip() for name in args.objectives.split(",") if name.strip()]
    args.pretrain_overrides, args.full_overrides = args.pretrain_override, args.full_override
    unknown = sorted(set(args.names) - set(OBJECTIVES))
    if unknown:
        parser.error(f"unknown objectives: {', '.join(unknown)}")
    reuse = dict(item.split("=", 1) for item in args.reuse if "=" in item)
    if len(reuse) != len(args.reuse) or not set(reuse) <= set(args.names):
        parser.error("--reuse takes OBJECTIVE=RUN_DIR for one of the --objectives")
    args.reuse = reuse
    for name in args.names:
        for shards in (args.train, args.test) if args.train else OBJECTIVES[name][1]:
            if not (ROOT / shards).is_file():
                parser.error(
                    f"missing {shards}: write the CIFAR-10 shards first (see the docstring)"
                )
    if not args.no_full and not (ROOT / args.finetune_config).is_file():
        parser.error(f"no finetune config {args.finetune_config}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    output_dir = ROOT / args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / "progress.log"
    rows = []
    for name in args.names:
        run_dir, facts = pretrain(name, args, log)
        rows.append(
            {
                "objective": name,
                "config": OBJECTIVES[name][0],
                "steps_planned": args.steps or OBJECTIVES[name][2],
                **facts,
                **evaluate(run_dir, args, log),
                "run_dir": str(run_dir),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    document = {
        "benchmark": "quality_cifar10",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "budget_minutes": args.minutes,
        "command": "python -m benchmarks.quality_cifar10 " + " ".join(argv or sys.argv[1:]),
        "rows": rows,
    }
    text = json.dumps(document, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    """The markdown table of benchmarks/README.md, on stderr; pretrained (random init)."""
    print(
        "\n| objective | steps | linear top-1 | kNN top-1 | full finetune top-1 |\n"
        "|---|---|---|---|---|",
        file=sys.stderr,
    )

    def pair(row: dict, key: str) -> str:
        if key not in row:
            return "not run"
        return f"{row[key]:.3f} ({row[f'{key}_random_init']:.3f})"

    for row in rows:
        cells = [pair(row, key) for key in ("linear_top1", "knn_top1", "full_top1")]
        print(
            f"| {row['objective']} | {row['steps_done']} | {' | '.join(cells)} |", file=sys.stderr
        )


if __name__ == "__main__":
    sys.exit(main())
