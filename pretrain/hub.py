"""The export in timm's Hugging Face Hub layout, and the command that uploads it.

Beside `export/encoder.safetensors` and `export/encoder.json`, every export folder holds

    config.json        {"architecture", "num_classes", "model_args": the timm arguments,
                        "pretrained_cfg": {"input_size", "mean", "std", "crop_pct", ...}}
    model.safetensors  the same state dict (a hard link to encoder.safetensors where it can be)
    README.md          a short model card

which is what timm reads from a Hub repo: `timm.create_model("local-dir:RUN/export",
pretrained=True)` rebuilds the encoder from the folder, and after

    pretrain publish RUN_DIR --repo ORG/NAME [--private]

`timm.create_model("hf-hub:ORG/NAME", pretrained=True)` from anywhere. The upload needs a Hugging
Face token (`hf auth login` or HF_TOKEN); only the three files above go up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from pretrain.errors import UserError

HUB_FILES = ("config.json", "model.safetensors", "README.md")
# timm pretrained_cfg fields that describe the architecture, kept from its default config; the
# rest of that config (tag, license, urls, hub ids) describes timm's weights, not these.
ARCHITECTURE_FIELDS = ("fixed_input_size", "first_conv", "classifier", "pool_size")


def hub_config(
    name: str, kwargs: dict, image_size: int, mean, std, num_classes: int = 0, label_names=None
) -> dict:
    """config.json for timm `name` built with `kwargs`, fed `image_size` inputs."""
    import timm.models

    try:
        default = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # a model registered without any pretrained config
        default = None
    known = default.to_dict() if default is not None else {}
    pretrained_cfg = {key: known[key] for key in ARCHITECTURE_FIELDS if known.get(key)}
    if "img_size" in kwargs:  # the token grid changed with the size: timm's pool size is stale
        pretrained_cfg.pop("pool_size", None)
    pretrained_cfg.update(
        input_size=[3, image_size, image_size], interpolation="bicubic", crop_pct=1.0,
        crop_mode="center", mean=list(mean), std=list(std), num_classes=num_classes,
    )  # fmt: skip
    config = {"architecture": name, "num_classes": num_classes, "model_args": dict(kwargs)}
    if label_names:
        config["label_names"] = list(label_names)
    return {**config, "pretrained_cfg": pretrained_cfg}


def write_hub_layout(export_dir: Path, name: str, kwargs: dict, meta: dict) -> Path:
    """config.json, model.safetensors and README.md in export_dir, next to encoder.safetensors
    (written first); meta: the export card's extras (image_size, mean, std, objective, ...)."""
    export_dir = Path(export_dir)
    config = hub_config(
        name, kwargs, int(meta["image_size"]), meta["mean"], meta["std"],
        int(meta.get("num_classes", kwargs.get("num_classes", 0))), meta.get("label_names"),
    )  # fmt: skip
    _replace(export_dir / "config.json", lambda path: path.write_text(json.dumps(config, indent=2)))
    source = export_dir / "encoder.safetensors"

    def link_or_copy(path: Path) -> None:
        try:
            os.link(source, path)  # the same bytes: no second copy of the weights on disk
        except OSError:
            shutil.copyfile(source, path)

    _replace(export_dir / "model.safetensors", link_or_copy)
    _replace(export_dir / "README.md", lambda path: path.write_text(_model_card(name, meta)))
    return export_dir


def _replace(path: Path, write) -> None:
    """Write through a temporary name and rename: a reader sees the old file or the new one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    write(temporary)
    os.replace(temporary, path)


def _model_card(name: str, meta: dict) -> str:
    what = meta.get("task") or f"{meta.get('objective', 'self-supervised')} pretraining"
    steps = f", {meta['steps']} steps" if meta.get("steps") else ""
    return (
        f"---\nlibrary_name: timm\ntags: [image-feature-extraction, timm]\n---\n\n"
        f"# {name}, {what}{steps}\n\n"
        f"A `{name}` encoder trained with ssl-pretrain ({what}{steps}) on "
        f"{meta['image_size']} px images, normalized with mean {list(meta['mean'])} and std "
        f"{list(meta['std'])}.\n\n"
        "```python\nimport timm\n"
        'model = timm.create_model("hf-hub:ORG/NAME", pretrained=True)  # this repo\n```\n'
    )


def export_folder(path: str | Path) -> Path:
    """A run directory or its export folder -> the export folder holding the Hub files."""
    path = Path(path)
    folder = path / "export" if (path / "export").is_dir() else path
    missing = [name for name in HUB_FILES[:2] if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder} holds no {', '.join(missing)}: give a run directory or export folder "
            "written by this version of pretrain"
        )
    return folder


def publish(path: str | Path, repo_id: str, private: bool = False, token: str | None = None):
    """Upload the export's Hub files to repo_id (created if needed); returns the commit url."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    folder = export_folder(path)
    token = token or get_token()
    if not token:
        raise UserError(
            "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN, then run again"
        )
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo.repo_id, folder_path=folder, allow_patterns=list(HUB_FILES),
            commit_message=f"Upload {folder.parent.name} (ssl-pretrain)",
        )  # fmt: skip
    except (HfHubHTTPError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise UserError(f"upload to {repo_id} failed: {first_line}") from None
    return str(getattr(commit, "commit_url", commit))


def parser() -> argparse.ArgumentParser:
    arguments = argparse.ArgumentParser(
        prog="pretrain publish",
        description="Upload a run's encoder export to the Hugging Face Hub in timm's layout.",
    )
    arguments.add_argument("run", help="run directory or its export folder")
    arguments.add_argument("--repo", required=True, help="Hub repo id, e.g. my-org/my-mae")
    arguments.add_argument("--private", action="store_true", help="create the repo private")
    return arguments


def main(argv: list[str]) -> int:
    """`pretrain publish RUN_DIR --repo ORG/NAME [--private]`."""
    args = parser().parse_args(argv)
    try:
        url = publish(args.run, args.repo, private=args.private)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"uploaded {export_folder(args.run)} to {args.repo}: {url}")
    return 0
