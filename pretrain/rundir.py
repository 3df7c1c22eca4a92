"""The run directory: created for a new run, reopened for a resumed one, and guarded against
continuing a run with other settings.

    runs/<name>/config.yaml     the resolved config (rewritten when a continued run changes
                                what may change: its length, checkpointing, logging)
    runs/<name>/run.json        {"run_id": ...}: the W&B run id, the same across resumes
"""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import datetime
from pathlib import Path

import yaml

from pretrain.checkpoint import latest_checkpoint
from pretrain.config import Config, save_config, to_dict
from pretrain.distributed import broadcast_from_main
from pretrain.errors import ConfigError

# What a continued run may change: how long it runs, how often it saves, what it logs and
# monitors, whether it is sharded (checkpoints have one layout).
CHANGEABLE_ON_RESUME = (
    "train.steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_nonfinite_steps",
    "train.time_limit_minutes",
    "train.compile",
    "train.fsdp",
    "logging.",
    "monitor.",
)


def open_run_dir(config: Config, accelerator, resume_dir) -> tuple[Path, str]:
    """Create (or reopen, on resume) the run directory; returns it and the W&B run id.

    A new run's directory (train.output_dir / train.run_name) that already holds checkpoints
    is continued: the same command again resumes it, unless its settings differ.
    """
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
        return run_dir, run_id
    name = config.train.run_name or broadcast_from_main(
        accelerator, f"{config.objective.name}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    run_dir = Path(config.train.output_dir) / name
    if latest_checkpoint(run_dir) is not None:  # the same command again: continue that run
        changed = changed_settings(config, run_dir)
        if changed:
            raise ConfigError(
                f"run directory {run_dir} holds checkpoints of a run with other settings "
                f"({', '.join(changed)}): rerun the same command to continue it, or pick "
                "another train.run_name"
            )
        accelerator.wait_for_everyone()  # every rank has read the old config.yaml
        if accelerator.is_main_process:
            save_config(config, run_dir / "config.yaml")  # e.g. a longer train.steps
        run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
        return run_dir, run_id
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / "run.json").is_file():
        raise ConfigError(f"{run_dir} exists and is not a run directory; pick another run name")
    run_id = broadcast_from_main(accelerator, uuid.uuid4().hex[:12])
    if accelerator.is_main_process:
        if run_dir.exists():  # an earlier start of this run that died before its first checkpoint
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        save_config(config, run_dir / "config.yaml")
        (run_dir / "run.json").write_text(json.dumps({"run_id": run_id}))
    accelerator.wait_for_everyone()
    return run_dir, run_id


def changed_settings(config: Config, run_dir: Path) -> list[str]:
    """Keys whose values differ from the run directory's config.yaml, apart from the changeable
    ones; keys that the saved config lacks (added to the code since) are not compared."""
    saved_file = run_dir / "config.yaml"
    saved = yaml.safe_load(saved_file.read_text()) if saved_file.is_file() else {}
    changed = []
    for section, values in to_dict(config).items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            before = (saved or {}).get(section) or {}
            if dotted.startswith(CHANGEABLE_ON_RESUME) or key not in before:
                continue
            if before[key] != value:
                changed.append(dotted)
    return changed
