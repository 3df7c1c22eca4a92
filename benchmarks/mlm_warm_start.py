"""Masked language modelling on the demo captions, and CLIP's text tower warm-started from it.

1. `pretrain` configs/pretrain/demo_mlm.yaml, then `finetune mlm --compare-random-init`: held-out
   masked-token top-1 beside random init and the best constant guess; beside them an estimate
   of the best top-1 any model can reach on those masks (for each masked position, the most
   frequent token there among the TRAINING captions that agree with the caption everywhere
   else), and how alike MLM made the words of one attribute (mean pairwise cosine of the
   token-embedding rows of the six shape and six colour words).
2. For each seed: `pretrain` configs/pretrain/demo_clip.yaml with the text tower from random init
   and from the mlm run (`clip.text_init`), the same steps, then `finetune zeroshot`.

A run directory that already holds a finished run (summary.json at the planned steps) is reused,
so the analysis can be redone without training again. Prints one JSON document (a table on
stderr); `--out` keeps the JSON.

    python -m benchmarks.mlm_warm_start --seeds 0,1 --out benchmarks/results/mlm_warm_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import ROOT, run_cli

MLM_CONFIG = "configs/pretrain/demo_mlm.yaml"
CLIP_CONFIG = "configs/pretrain/demo_clip.yaml"


def pretrain(config: str, run_dir: Path, steps: int | None, extra: list[str], log: Path) -> dict:
    """The run's summary: trained now, or read from a finished run in run_dir."""
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if steps is None or summary["steps"] == steps:
            return {**summary, "reused": True}
    command = [
        sys.executable, "-m", "pretrain", "--config", config, "logging.wandb=false",
        f"train.output_dir={run_dir.parent}", f"train.run_name={run_dir.name}", *extra,
        *([f"train.steps={steps}"] if steps else []),
    ]  # fmt: skip
    return {**run_cli(command, log), "reused": False}


def summary_fields(summary: dict) -> dict:
    return {key: summary.get(key) for key in ("steps", "final_loss", "wall_s", "reused")}


def tokens_of(shards: str, context_length: int) -> torch.Tensor:
    """Every caption of `shards` as token ids [N, T] (no image is decoded)."""
    from pretrain.data import eval_loader
    from pretrain.models.text import CaptionTokenizer

    tokenizer = CaptionTokenizer(context_length)

    def ids(sample: dict) -> dict:
        return {"ids": tokenizer([sample["caption"]])[0]}

    ids.needs_image = False
    batches = eval_loader(shards, ids, 1000, rank=0, world_size=1, num_workers=0)
    return torch.cat([batch["ids"] for batch in batches])


def ceiling_top1(run_dir: Path, seed: int) -> float:
    """The best top-1 on `finetune mlm`'s masks (mask-all, mlm.seed): per masked position, the
    most frequent token there among the training captions equal at every unmasked position."""
    from pretrain.config import load_config
    from pretrain.data import eval_loader
    from pretrain.data.transforms import IGNORE_INDEX, MaskedCaption
    from pretrain.models.text import CaptionTokenizer

    config = load_config(run_dir / "config.yaml")
    train = tokens_of(config.data.train_shards, config.mlm.context_length)  # [N, T]
    masking = {"choose": config.mlm.mask_probability, "to_mask": 1.0, "to_random": 0.0}
    tokenizer = CaptionTokenizer(config.mlm.context_length)
    transform = MaskedCaption(tokenizer, masking, key_seed=seed)
    hits = total = 0
    for batch in eval_loader(config.data.val_shards, transform, 500, 0, 1, num_workers=0):
        for inputs, targets in zip(batch["text"], batch["text_targets"]):
            chosen = targets != IGNORE_INDEX
            agreeing = train[(train[:, ~chosen] == inputs[~chosen]).all(dim=1)]  # [K, T]
            for position in chosen.nonzero().flatten().tolist():
                total += 1
                if len(agreeing):
                    best = agreeing[:, position].mode().values.item()
                    hits += int(best == targets[position].item())
    return hits / max(1, total)


def attribute_cosines(run_dir: Path) -> dict:
    """Mean pairwise cosine of the embedding rows of the shape words and of the colour words,
    in the mlm export and in a random-init encoder of the same shape."""
    from safetensors.torch import load_file

    from pretrain.data.demo import COLOURS, SHAPES
    from pretrain.models.text import CaptionTokenizer

    tokenizer = CaptionTokenizer(8)
    trained = load_file(str(run_dir / "export" / "text_encoder.safetensors"))
    trained = trained["token_embedding.weight"]
    random_init = torch.randn(trained.shape, generator=torch.Generator().manual_seed(0)) * 0.02
    result = {}
    for name, words in (("shapes", list(SHAPES)), ("colours", list(COLOURS))):
        ids = [int(tokenizer([word])[0, 1]) for word in words]  # each is one BPE token
        for label, table in (("mlm", trained), ("random_init", random_init)):
            rows = F.normalize(table[ids], dim=1)
            similarity = rows @ rows.T
            off_diagonal = similarity[~torch.eye(len(ids), dtype=torch.bool)]
            result[f"{name}_{label}"] = round(off_diagonal.mean().item(), 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="CLIP training seeds, comma-separated")
    parser.add_argument("--mlm-steps", type=int, help="default: the config's")
    parser.add_argument("--clip-steps", type=int, help="default: the config's")
    parser.add_argument("--output-dir", default="runs/mlm-warm-start")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    output_dir = ROOT / args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / "progress.log"
    finetune = [sys.executable, "-m", "finetune"]

    mlm_dir = output_dir / "demo-mlm"
    mlm_summary = pretrain(MLM_CONFIG, mlm_dir, args.mlm_steps, [], log)
    heldout = run_cli([*finetune, "mlm", "--encoder", str(mlm_dir), "--compare-random-init",
                   "--no-wandb"], log)  # fmt: skip
    mlm = {
        **summary_fields(mlm_summary),
        **{
            key: heldout[key]
            for key in (
                "top1",
                "random_init_top1",
                "most_frequent_top1",
                "most_frequent_token",
                "perplexity",
                "random_init_perplexity",
                "masked_tokens",
                "val_captions",
                "corruption",
            )
        },  # fmt: skip
        "ceiling_top1": round(ceiling_top1(mlm_dir, seed=0), 4),
        "embedding_cosines": attribute_cosines(mlm_dir),
    }
    print(json.dumps(mlm), file=sys.stderr, flush=True)

    clip_rows = []
    for seed in [int(seed) for seed in args.seeds.split(",")]:
        for text in ("random", "mlm"):
            run_dir = output_dir / (f"clip-{text}" + (f"-seed{seed}" if seed else ""))
            extra = [
                f"train.seed={seed}",
                *([f"clip.text_init={mlm_dir}"] if text == "mlm" else []),
            ]
            summary = pretrain(CLIP_CONFIG, run_dir, args.clip_steps, extra, log)
            scores = run_cli([*finetune, "zeroshot", "--encoder", str(run_dir), "--config",
                          "configs/finetune/demo.yaml", "--no-wandb"], log)  # fmt: skip
            keys = ("top1", "top5", "image_to_text_r1", "text_to_image_r1")
            clip_rows.append({"seed": seed, "text_tower": text, **summary_fields(summary),
                              **{key: scores[key] for key in keys}})  # fmt: skip
            print(json.dumps(clip_rows[-1]), file=sys.stderr, flush=True)

    document = {
        "benchmark": "mlm_warm_start",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        "threads": torch.get_num_threads(),
        "command": "python -m benchmarks.mlm_warm_start " + " ".join(argv or sys.argv[1:]),
        "mlm": mlm,
        "clip": clip_rows,
    }
    text = json.dumps(document, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print("\n| seed | text tower | zero-shot top-1 | image-to-text R@1 |\n|---|---|---|---|",
          file=sys.stderr)  # fmt: skip
    for row in clip_rows:
        print(f"| {row['seed']} | {row['text_tower']} | {row['top1']:.3f} | "
              f"{row['image_to_text_r1']:.4f} |", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
