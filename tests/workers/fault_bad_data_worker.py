"""Launched by test_fault_tolerance under a 2-process launcher: train on damaged shards, then
read two evaluation specs split exactly across the ranks (one leaves rank 1 without shards).

    fault_bad_data_worker.py OUT VAL_SPEC_A VAL_SPEC_B [section.key=value ...]

Writes OUT/eval_rank{R}.json: {"a": {"samples", "skipped"}, "b": {...}}; the CLI's summary line
is printed by rank 0 as usual.
"""

import json
import sys
from pathlib import Path

from pretrain import engine
from pretrain.__main__ import main
from pretrain.data import eval_loader
from pretrain.data.transforms import eval_transform

out, val_a, val_b = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


def evaluate(objective, accelerator):
    counts = {}
    for name, spec in (("a", val_a), ("b", val_b)):
        loader = eval_loader(
            spec.split(","),
            eval_transform(32),
            batch_size=8,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            num_workers=1,
        )
        samples = sum(len(batch["image"]) for batch in loader)
        counts[name] = {"samples": samples, "skipped": loader.skipped}
    (out / f"eval_rank{accelerator.process_index}.json").write_text(json.dumps(counts))
    accelerator.wait_for_everyone()  # no rank may hang waiting for another


train = engine.train
engine.train = lambda config, resume_dir=None: train(config, resume_dir, on_end=evaluate)
sys.exit(main(sys.argv[4:]))
