"""What `finetune full` puts in front of a user beside its accuracy: a one-line warning when the
first epoch left the training loss at the chance level, and the encoder's own linear-probe top-1
(from a `finetune linear` result in the same output folder), so that finetuning is judged
against the simpler alternative in one place.

Chance level: a classifier that gives every one of C classes the same probability has a
cross-entropy of exactly ln C against any target that sums to one: hard labels, label-smoothed
ones and mixup/cutmix mixtures alike. Finetuning starts there (the new head is initialised near
zero). The check reads the mean loss over the last quarter of epoch 1, where the epoch left the
model (the epoch's mean still carries its first steps at ln C). Still within CHANCE_TOLERANCE
below ln C: next to nothing was learnt, the lr is too small for the model and budget; above
ln C (by more than ABOVE_TOLERANCE): training made the loss worse, the lr is too large.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from finetune.config import FullConfig
from finetune.encoder import EncoderSource

# Measured in the finetuning sweeps (benchmarks/README.md): every run that went on to learn ended
# epoch 1 at 0.94-0.986 ln C on the demo set (learning starts late there) and lower on CIFAR-10;
# runs that stayed at chance for all their epochs ended it at 0.996-1.000 ln C, and the demo
# encoder at 4x and 12x its best lr at 1.014 and 1.006 ln C. The tail mean of a stuck run wobbles
# by about 0.4% around ln C, hence "above" only from 0.3% up.
CHANCE_TOLERANCE = 0.01
ABOVE_TOLERANCE = 0.003


def chance_level_warning(
    train_loss: float, num_classes: int, lr: float, settings: FullConfig
) -> str | None:
    """One line when `train_loss`, the mean over the last quarter of the first epoch, is at (or
    above) ln(num_classes), naming the lr the run used and the setting that changes it; None when
    the run has left the chance level."""
    if num_classes < 2:
        return None
    chance = math.log(num_classes)
    if train_loss < chance * (1 - CHANCE_TOLERANCE):
        return None
    knob = "full.lr" if settings.lr else "full.blr (or set full.lr)"
    rule = "" if settings.lr else f" (= full.blr {settings.blr:g} x global batch / 256)"
    where = f"training loss {train_loss:.3f} at the end of epoch 1"
    level = f"the chance level ln({num_classes}) = {chance:.3f}"
    if train_loss > chance * (1 + ABOVE_TOLERANCE):
        return f"warning: {where} is above {level}: lr {lr:.3g}{rule} is too large; lower {knob}"
    stuck = f"next to nothing learnt at lr {lr:.3g}{rule}"
    return f"warning: {where} is still at {level}: {stuck}; raise {knob}"


def cached_linear_probe(
    output_dir: Path, source: EncoderSource, random_init: bool, val_samples: int
) -> dict:
    """{"linear_probe_top1": top-1, "linear_probe_pool": "avg" or "cls" (the probe's features,
    which may differ from this finetune's), "linear_probe_result": path}; None each when absent.

    The probe counts when `OUTPUT/linear.json` (`linear_random_init.json` for a random-init
    run) measured this encoder: the same export, the same pretraining steps, the same number
    of val samples, and written after the export was (a rerun of pretraining makes it stale).
    """
    path = Path(output_dir) / ("linear_random_init.json" if random_init else "linear.json")
    missing = {"linear_probe_top1": None, "linear_probe_pool": None, "linear_probe_result": None}
    try:
        probe = json.loads(path.read_text())
        weights = source.card_path.with_name("encoder.safetensors")
        fresh = path.stat().st_mtime_ns >= weights.stat().st_mtime_ns
    except (OSError, ValueError):
        return missing
    same = (
        probe.get("mode") == "linear"
        and probe.get("encoder") == str(source.card_path)
        and probe.get("random_init") == random_init
        and probe.get("steps") == (0 if random_init else source.card.get("steps"))
        and probe.get("val_samples") == val_samples
    )
    if not (same and fresh and isinstance(probe.get("top1"), (int, float))):
        return missing
    return {
        "linear_probe_top1": probe["top1"],
        "linear_probe_pool": probe.get("pool"),
        "linear_probe_result": str(path),
    }
