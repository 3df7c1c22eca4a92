"""Any encoder into `finetune`: besides this toolkit's run directories and exports, a timm model
with its weights, so that a run is compared with official weights under the same probe.

    --encoder RUN_DIR | RUN_DIR/export | encoder.json          this toolkit's export
    --encoder FOLDER                                           timm's Hub layout: config.json
                                                               (architecture, model_args,
                                                               pretrained_cfg) + model.safetensors
    --encoder hf-hub:ORG/NAME                                  that Hub repo, from the local cache
    --encoder NAME --weights FILE [--timm-kwargs '{...}']      a timm model and a state dict
                                                               (.safetensors, or .bin/.pth read
                                                               with weights_only=True)
    --encoder NAME.TAG (or NAME: its default tag)              timm's pretrained weights, from
                                                               the local Hugging Face cache

Nothing here downloads: pretrained weights are looked up in the local Hugging Face cache only
(huggingface_hub.try_to_load_from_cache), and when they are absent the command stops in one line
saying how to fetch them. Weights load strictly into the headless model (a classifier head in
the file is dropped), so a file for another architecture fails here, not in the probe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
import yaml
from safetensors.torch import load_file
from timm.models import get_pretrained_cfg, split_model_name_tag

from finetune.encoder import EncoderNotFound, EncoderSource, locate_encoder
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.errors import ModelError
from pretrain.models.encoder import EncoderSpec

HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # timm's Hub files, preferred first


def find_encoder(spec: str, weights: str | None = None, kwargs: str | None = None):
    """The EncoderSource `--encoder spec` names (see the module docstring)."""
    extra = _parse_kwargs(kwargs)
    if spec.startswith("hf-hub:"):
        return hub_folder_source(_cached_hub_folder(spec[len("hf-hub:") :]))
    path = Path(spec)
    if path.exists() or os.sep in spec or spec.startswith("."):  # a path, not a timm name
        if weights is not None or extra:
            raise EncoderNotFound("--weights and --timm-kwargs go with a timm model name")
        if (path / "config.json").is_file() and not _has_card(path):
            return hub_folder_source(path)
        return locate_encoder(path)  # its one-line error names the export it expected
    architecture, tag = split_model_name_tag(spec)
    if not timm.is_model(architecture):
        raise EncoderNotFound(
            f"--encoder {spec}: no encoder export there, and not a timm model name (see "
            "timm.list_models()); see `finetune linear --help` for what --encoder takes"
        )
    if tag and tag not in _tags(architecture):
        known = ", ".join(_tags(architecture)[:6]) or "none"
        raise EncoderNotFound(f"timm has no pretrained tag {spec} (its tags: {known})")
    if weights is not None:
        return timm_source(spec, read_weights_file(Path(weights)), extra, origin=weights)
    return timm_source(spec, _cached_pretrained(architecture, tag), extra, origin=spec)


def _tags(architecture: str) -> list[str]:
    return [name.split(".", 1)[1] for name in timm.list_pretrained(f"{architecture}.*")]


def _has_card(path: Path) -> bool:
    return any(
        candidate.is_file() and candidate.name == "encoder.json"
        for candidate in (path, path / "encoder.json", path / "export" / "encoder.json")
    )


def _parse_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise ModelError(f"--timm-kwargs must be a mapping such as '{{depth: 4}}', got {text!r}")
    return value


def read_weights_file(path: Path) -> dict:
    """A state dict from .safetensors, or from a PyTorch file read with weights_only=True (so
    it cannot run code); unwrapped from {"model": ...} / {"state_dict": ...} and DDP's
    `module.` prefix, as training scripts save them."""
    if not path.is_file():
        raise EncoderNotFound(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file or one that holds objects, not tensors
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
        refused = next((line for line in lines if "Unsupported global" in line), None)
        if refused is not None:
            raise EncoderNotFound(
                f"cannot read weights from {path} with weights_only=True: it holds more than "
                f"tensors ({refused.split('Unsupported global: ')[-1].split(' was not')[0]}); "
                "save the state "
                "dict alone (torch.save(model.state_dict(), ...) or safetensors)"
            ) from None
        raise EncoderNotFound(f"cannot read weights from {path}: {lines[0][:200]}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EncoderNotFound(f"{path} does not hold a state dict of tensors")
    return {name.removeprefix("module."): tensor for name, tensor in state.items()}


def timm_source(name: str, weights: dict, kwargs: dict, origin: str) -> EncoderSource:
    """A headless timm encoder `name` (architecture[.tag]) with these weights, checked to load."""
    architecture, tag = split_model_name_tag(name)
    timm_kwargs = {**kwargs, "num_classes": 0}
    model = EncoderSpec(name, timm_kwargs).create()  # the tag's pretrained_cfg: its mean, std
    head = tuple(f"{prefix}." for prefix in _classifier_names(model))
    kept = {key: value for key, value in weights.items() if key in model.state_dict()
            or not key.startswith(head)}  # fmt: skip
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if missing or unexpected:
        raise ModelError(
            f"the weights of {origin} do not fit {name} (with --timm-kwargs {kwargs or '{}'}): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    cfg = model.pretrained_cfg
    card = {
        "timm_name": architecture,
        "timm_kwargs": timm_kwargs,
        "image_size": int(kwargs.get("img_size") or cfg.get("input_size", (3, 224, 224))[-1]),
        "mean": list(cfg.get("mean", IMAGENET_MEAN)),
        "std": list(cfg.get("std", IMAGENET_STD)),
        "objective": None,
        "steps": None,
        "source": origin,
    }
    label = f"timm-{architecture}" + (f".{tag}" if tag else "")
    return EncoderSource(card=card, card_path=None, weights=kept, label=label)


def _classifier_names(model) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or "head"
    return (names,) if isinstance(names, str) else tuple(names)


def hub_folder_source(folder: Path) -> EncoderSource:
    """timm's Hub layout: config.json {"architecture", "model_args", "pretrained_cfg"} and
    model.safetensors (or pytorch_model.bin), as `pretrain` exports and the Hub serves it."""
    try:
        config = json.loads((folder / "config.json").read_text())
        architecture = config["architecture"]
    except (OSError, ValueError, KeyError) as error:
        raise EncoderNotFound(f"{folder}/config.json is not a timm model config: {error}") from None
    weights = next((folder / name for name in HUB_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise EncoderNotFound(f"{folder} holds no {' or '.join(HUB_WEIGHTS)}")
    model_args = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
    source = timm_source(architecture, read_weights_file(weights), model_args, str(folder))
    pretrained = config.get("pretrained_cfg", {})
    for key in ("mean", "std"):
        if key in pretrained:
            source.card[key] = list(pretrained[key])
    if "input_size" in pretrained and "img_size" not in model_args:
        source.card["image_size"] = int(pretrained["input_size"][-1])
    source.label = folder.name if folder.name != "export" else folder.parent.name
    return source


def _cached_hub_folder(repo_id: str) -> Path:
    """The local snapshot folder of a Hub repo that holds config.json and its weights."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        raise EncoderNotFound(_not_cached(repo_id))
    return Path(config).parent


def _cached_pretrained(architecture: str, tag: str) -> dict:
    """timm's pretrained weights for architecture.tag from the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    cfg = get_pretrained_cfg(f"{architecture}.{tag}" if tag else architecture)
    if cfg is None or not _tags(architecture):
        raise EncoderNotFound(
            f"timm has no pretrained weights for {architecture}; pass --weights FILE"
        )
    if not cfg.hf_hub_id:
        raise EncoderNotFound(
            f"timm's weights for {architecture}.{tag} are not on the Hugging Face Hub; download "
            "them yourself and pass --weights FILE"
        )
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHTS
    for name in names:
        found = try_to_load_from_cache(cfg.hf_hub_id, name)
        if isinstance(found, str) and os.path.isfile(found):
            return read_weights_file(Path(found))
    raise EncoderNotFound(_not_cached(cfg.hf_hub_id))


def _not_cached(repo_id: str) -> str:
    from huggingface_hub import constants

    return (
        f"{repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        f"nothing is downloaded here: fetch it once with `hf download {repo_id}` (or "
        "huggingface-cli download), or pass --weights FILE"
    )
