"""What every finetune mode needs: the settings, the encoder's source, the shards, the class
names, the process group and where results go; and the result fields every mode shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from finetune.config import FinetuneConfig, section_dict
from finetune.encoder import EncoderSource
from finetune.report import Report


@dataclass
class Job:
    mode: str
    config: FinetuneConfig
    source: EncoderSource
    accelerator: Accelerator
    train_urls: list[str]
    val_urls: list[str]
    class_names: list[str] | None
    output_dir: Path
    resume: bool = False  # full finetuning: continue from the last checkpoint in output_dir

    @property
    def cache_dir(self) -> Path | None:
        data = self.config.data
        if not data.cache:
            return None
        return Path(data.cache_dir) if data.cache_dir else self.output_dir / "features"

    def report(self, random_init: bool) -> Report:
        return Report(
            self.output_dir,
            self.result_name(random_init),
            self.mode,
            self.source,
            self.config.logging,
            {**section_dict(self.config, self.mode), "random_init": random_init},
            is_main=self.accelerator.is_main_process,
        )

    def result_name(self, random_init: bool) -> str:
        """e.g. "linear" or "linear_random_init": the result's file names and W&B run name."""
        return f"{self.mode}_random_init" if random_init else self.mode

    def title(self, what: str, random_init: bool) -> str:
        """A picture title: what was measured, on which encoder."""
        return f"{what}, {self.source.name}{' random init' if random_init else ''}"

    def describe(self, random_init: bool) -> dict:
        """The result fields every mode shares."""
        card = self.source.card
        return {
            "mode": self.mode,
            "objective": card.get("objective"),
            "steps": 0 if random_init else card.get("steps"),
            "random_init": random_init,
            "encoder": self.source.location,
            "run_dir": str(self.source.run_dir) if self.source.run_dir else None,
            "processes": self.accelerator.num_processes,
            **({} if self.mode in ("zeroshot", "mlm") else {"pool": self.config.data.pool}),
        }

    def num_classes(self, *label_sets: torch.Tensor) -> int:
        """The class count: the largest label + 1, or the number of class names if larger."""
        largest = max(int(labels.max()) for labels in label_sets) + 1
        return max(largest, len(self.class_names or []))
