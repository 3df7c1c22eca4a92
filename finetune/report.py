"""Where a finetune result goes: `<output>/<name>.json`, a confusion-matrix PNG, and W&B.

W&B (main process only) gets one run per result, grouped under the pretraining run's id
(run.json) so that every evaluation of an encoder sits next to its pretraining run; job_type
is the mode. Offline without an API key, like pretraining.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.config import LoggingConfig
from finetune.encoder import EncoderSource
from finetune.metrics import confusion_matrix, draw_confusion, per_class_accuracy
from pretrain.tracking import wandb_mode


class Report:
    def __init__(
        self,
        output_dir: Path,
        name: str,
        mode: str,
        source: EncoderSource,
        settings: LoggingConfig,
        config: dict,
        is_main: bool = True,
    ):
        self.output_dir = Path(output_dir)
        self.name = name  # e.g. "linear" or "linear_random_init": file names and W&B run name
        self.is_main = is_main
        self.wandb_run = None
        if not is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if settings.wandb:
            import wandb

            project = settings.wandb_project or (
                source.run_config.get("logging", {}).get("wandb_project") or "ssl-pretrain"
            )
            self.wandb_run = wandb.init(
                project=project,
                entity=settings.wandb_entity,
                group=source.run_id,
                job_type=mode,
                name=f"{source.name}-{name}",
                dir=str(self.output_dir),
                mode=wandb_mode(settings.wandb_mode),
                config=config,
                settings=wandb.Settings(console="off", silent=True),
            )

    def log(self, metrics: dict, step: int) -> None:
        """Per-epoch metrics (full finetune): W&B history; the JSON gets the final ones."""
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def confusion(
        self,
        scores_or_predictions: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        class_names: list[str] | None,
        title: str,
    ) -> dict:
        """Confusion matrix PNG (and W&B image) from scores [N, C] or predictions [N];
        returns {"per_class_top1": [...], "confusion_png": path} for the result JSON."""
        predictions = (
            scores_or_predictions.argmax(dim=1)
            if scores_or_predictions.ndim == 2
            else scores_or_predictions
        )
        matrix = confusion_matrix(predictions.cpu(), labels.cpu(), num_classes)
        return self.confusion_from_matrix(matrix, class_names, title)

    def confusion_from_matrix(
        self, matrix: torch.Tensor, class_names: list[str] | None, title: str
    ) -> dict:
        if not self.is_main:
            return {}
        path = draw_confusion(
            matrix, class_names, self.output_dir / f"{self.name}_confusion.png", title
        )
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({"confusion": wandb.Image(str(path))})
        return {"per_class_top1": per_class_accuracy(matrix), "confusion_png": str(path)}

    def finish(self, result: dict) -> Path | None:
        """Writes the result JSON (main process); W&B gets it as the run summary."""
        if not self.is_main:
            return None
        path = self.output_dir / f"{self.name}.json"
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(result, indent=1) + "\n")
        temporary.replace(path)
        if self.wandb_run is not None:
            for key, value in result.items():
                if isinstance(value, (int, float, str)) or value is None:
                    self.wandb_run.summary[key] = value
            self.wandb_run.finish()
        return path
