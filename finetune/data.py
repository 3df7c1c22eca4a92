"""Which shards and class names a finetune command uses.

Shards: the flags / config first, else the pretraining run's own data.train_shards and
data.val_shards (its config.yaml), else the embedded demo data. Class names: data.classes,
else the `class_names` of the shard set's index JSON (written by `pretrain shards ...`).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Sequence

from accelerate import Accelerator

from finetune.config import DataConfig
from finetune.encoder import EncoderSource
from pretrain.config import DataConfig as PretrainDataConfig
from pretrain.data import demo_shards, expand_shards, peek_fields
from pretrain.errors import DataError


def resolve_shards(
    data: DataConfig, source: EncoderSource, accelerator: Accelerator, need_train: bool = True
) -> tuple[list[str], list[str]]:
    """(train urls, val urls); train is [] when not needed (zero-shot)."""
    run_data = source.run_config.get("data", {})
    train = data.train_shards or run_data.get("train_shards", "")
    val = data.val_shards or run_data.get("val_shards", "")
    if not train and not val:
        demo = _demo_shards(accelerator)
        train, val = demo["train"], demo["val"]
    if not val:
        raise DataError("give val shards (--val): the pretraining run names none")
    if need_train and not train:
        raise DataError("give train shards (--train): the pretraining run names none")
    train_urls = expand_shards(train, allow_pipe=data.allow_pipe) if need_train else []
    return train_urls, expand_shards(val, allow_pipe=data.allow_pipe)


def require_labels(urls: Sequence[str], split: str, mode: str) -> None:
    """Stop in one line, before any long pass, when a probe's shards carry no class labels
    (a look at their first sample: unlabelled shards, img2dataset-style sets)."""
    fields = peek_fields(list(urls))
    if fields is not None and "cls" not in fields:
        more = " ..." if len(urls) > 1 else ""
        raise DataError(
            f"finetune {mode} needs labelled data, and the {split} shards ({urls[0]}{more}) carry "
            "no class labels (cls): give --train and --val shards with labels, e.g. written by "
            "`pretrain shards imagefolder`"
        )


def _demo_shards(accelerator: Accelerator) -> dict:
    """The embedded demo set at the pretraining defaults, written once by the main process."""
    defaults = PretrainDataConfig()
    if accelerator.is_main_process:
        print(f"no shards given: using the demo data in {defaults.demo_dir}", file=sys.stderr)
    return demo_shards(
        accelerator,
        defaults.demo_dir,
        defaults.demo_train_samples,
        defaults.demo_val_samples,
        defaults.image_size,
    )


def index_class_names(urls: Sequence[str]) -> list[str] | None:
    """`class_names` from the index JSON that lists the first of these shards, if any."""
    if not urls or "://" in urls[0] or urls[0].startswith("pipe:"):
        return None
    folder, name = os.path.split(urls[0])
    for index_path in sorted(glob.glob(os.path.join(glob.escape(folder), "*-index.json"))):
        try:
            with open(index_path) as handle:
                index = json.load(handle)
            names = [shard["name"] for shard in index["shards"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if name in names and index.get("class_names"):
            return [str(class_name) for class_name in index["class_names"]]
    return None


def class_names_for(data: DataConfig, *url_lists: Sequence[str]) -> list[str] | None:
    if data.classes:
        return list(data.classes)
    for urls in url_lists:
        names = index_class_names(urls)
        if names:
            return names
    return None
