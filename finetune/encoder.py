"""Find an exported encoder and its pretraining run; build it frozen, random-init, or with a head.

`--encoder` may name a run directory, its `export/` folder, or `encoder.json` itself; any other
timm encoder (a model name with a weights file, a pretrained tag in the local cache, a Hub-layout
folder) comes through finetune.sources as the same EncoderSource. The export is a headless timm
model (`num_classes=0`) whatever the objective was, so decoders and projection heads never come
along. At another image size than the encoder's (`data.image_size`), a patch model is built for
that size and its position embeddings are resampled as timm resamples them; the patch size stays.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from pretrain.checkpoint import EXPORT, TEXT_CARD
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.errors import ConfigError, ModelError, UserError
from pretrain.models.encoder import EncoderSpec


class EncoderNotFound(UserError):
    """--encoder names nothing loadable; one line for the user."""


@dataclass
class EncoderSource:
    """An encoder: an export of this toolkit (and, when it can be found, the pretraining run it
    came from), or any timm encoder whose weights are already in memory (finetune.sources)."""

    card: dict  # encoder.json: timm_name, timm_kwargs, objective, steps, image_size, mean, std
    card_path: Path | None  # None for encoders that are not an export of this toolkit
    run_dir: Path | None = None
    run_id: str | None = None  # the pretraining W&B run id (run.json): the group of our runs
    run_config: dict = field(default_factory=dict)  # the run's config.yaml
    weights: dict | None = None  # the state dict, when it does not come from card_path's folder
    label: str = ""  # names a source without a card: "timm-vit_small_patch16_224.augreg_in1k"

    @property
    def name(self) -> str:
        if self.run_dir:
            return self.run_dir.name
        if self.card_path is None:
            return self.label
        folder = self.card_path.parent
        return folder.parent.name if folder.name == EXPORT else folder.name

    @property
    def location(self) -> str:
        """What the results name as the encoder: the card's path, or where the weights came from."""
        return str(self.card_path) if self.card_path is not None else self.card["source"]

    def load_weights(self) -> dict:
        if self.weights is not None:
            return self.weights
        return load_file(str(self.card_path.with_name("encoder.safetensors")))

    def timm_kwargs(self, image_size: int | None = None) -> dict:
        """The card's timm arguments, for `image_size` inputs when the model takes a size."""
        kwargs = dict(self.card["timm_kwargs"])
        if image_size and image_size != self.image_size and "img_size" in kwargs:
            kwargs["img_size"] = image_size
        return kwargs

    @property
    def image_size(self) -> int:
        return int(self.card.get("image_size") or self.card["timm_kwargs"].get("img_size", 224))

    @property
    def mean(self) -> tuple:
        return tuple(self.card.get("mean", IMAGENET_MEAN))

    @property
    def std(self) -> tuple:
        return tuple(self.card.get("std", IMAGENET_STD))

    def create(
        self, random_init: bool, seed: int = 0, image_size: int | None = None, **overrides
    ) -> nn.Module:
        """The encoder (eval mode) for `image_size` inputs (default: its own): its weights, or
        a fresh seeded init of the same architecture (the baseline that shows what pretraining
        bought). `overrides` change timm arguments such as num_classes; then weights load
        except the new head."""
        torch.manual_seed(seed)
        kwargs = {**self.timm_kwargs(image_size), **overrides}
        model = EncoderSpec(self.card["timm_name"], kwargs).create()
        if not random_init:
            load_all_but_head(model, fit_position_embeddings(model, self.load_weights()))
        return model.eval()


def locate_encoder(
    path: str | Path,
    card_name: str = "encoder.json",
    required: tuple[str, ...] = ("timm_name", "timm_kwargs"),
) -> EncoderSource:
    """The export card `card_name` (the image encoder's by default; TEXT_CARD for an mlm run's
    text encoder) at `path` (a run directory, its export folder, or the card), and its run."""
    path = Path(path)
    card_path = next(
        (
            candidate
            for candidate in (path, path / card_name, path / EXPORT / card_name)
            if candidate.is_file() and candidate.name == card_name
        ),
        None,
    )
    if card_path is None:
        hint = ""
        if card_name != TEXT_CARD and (path / EXPORT / TEXT_CARD).is_file():
            hint = "; it holds a text encoder (an mlm run): use `finetune mlm`"
        raise EncoderNotFound(
            f"no encoder export at {path} (expected {path / EXPORT / card_name}){hint}"
        )
    try:
        card = json.loads(card_path.read_text())
    except ValueError as error:
        raise EncoderNotFound(f"unreadable encoder card {card_path}: {error}") from None
    missing = [key for key in required if key not in card]
    if missing:
        raise EncoderNotFound(f"encoder card {card_path} lacks {', '.join(missing)}")
    source = EncoderSource(card=card, card_path=card_path)
    run_dir = _find_run_dir(card_path, card)
    if run_dir is not None:
        source.run_dir = run_dir
        source.run_config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        run_json = run_dir / "run.json"
        if run_json.is_file():
            source.run_id = json.loads(run_json.read_text()).get("run_id")
    return source


def _find_run_dir(card_path: Path, card: dict) -> Path | None:
    """The folder above export/, else the card's own note of its run (if it still exists)."""
    for candidate in (card_path.parent.parent, Path(card.get("run_dir") or "/nonexistent")):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def fit_position_embeddings(model: nn.Module, weights: dict) -> dict:
    """`weights` with a ViT's absolute position embeddings resampled to `model`'s patch grid
    (bicubic, antialiased, the class/register tokens' embeddings kept: what timm does when it
    loads pretrained weights at another image size). Same grid: returned as they are."""
    table = weights.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if table is None or target is None or table.shape == target.shape:
        return weights
    patches = weights.get("patch_embed.proj.weight")
    if patches is not None and patches.shape != model.patch_embed.proj.weight.shape:
        raise ModelError(
            f"the weights have {tuple(patches.shape[-2:])} patches and the model "
            f"{tuple(model.patch_embed.proj.weight.shape[-2:])}: the patch size cannot change"
        )
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    resampled = resample_abs_pos_embed(
        table, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix,
        interpolation="bicubic", antialias=True,
    )  # fmt: skip
    return {**weights, "pos_embed": resampled}


def load_all_but_head(model: nn.Module, weights: dict) -> None:
    """Strict loading, except that the classifier head (absent from a headless export) may be
    missing: every other key must match."""
    head_names = _head_parameter_names(model)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if name not in head_names]
    if missing or unexpected:
        raise ModelError(
            f"the export does not fit {type(model).__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )


def _head_parameter_names(model: nn.Module) -> set[str]:
    if not hasattr(model, "get_classifier"):
        return set()
    head = model.get_classifier()
    prefix = next((name for name, module in model.named_modules() if module is head), None)
    if not prefix or not isinstance(head, nn.Module):
        return set()
    return {f"{prefix}.{name}" for name in head.state_dict()}


def set_pooling(model: nn.Module, pool: str, num_classes: int = 0) -> None:
    """Frozen features / classifier input: "avg" (mean of patch tokens) or "cls" (class token).

    timm ViTs take global_pool "avg" or "token"; convolutional models pool by average only.
    Resetting the classifier also makes a new head when num_classes > 0.
    """
    if pool == "cls":
        if getattr(model, "cls_token", None) is None:
            raise ModelError("this encoder has no class token; use data.pool=avg")
        timm_pool = "token"
    else:
        timm_pool = "avg"
    if isinstance(getattr(model, "global_pool", None), str):
        model.reset_classifier(num_classes, global_pool=timm_pool)
    elif num_classes:
        model.reset_classifier(num_classes)


def build_classifier(
    source: EncoderSource,
    num_classes: int,
    pool: str,
    random_init: bool,
    seed: int = 0,
    image_size: int | None = None,
    **extra,
) -> tuple[nn.Module, dict]:
    """The encoder with a new `num_classes` head on `pool`-pooled features for `image_size`
    inputs, in train mode, plus the timm kwargs that rebuild it. `extra`: more timm arguments
    (drop_path_rate).

    The pooling goes into the timm arguments so the saved classifier rebuilds with plain
    timm. Some models then add layers (a ViT with global_pool="avg" moves its final norm to
    fc_norm); the first variant whose parameter names match the export's is taken, so the
    pretrained weights load strictly.
    """
    headless = source.create(random_init=True, seed=seed, image_size=image_size)
    if pool == "cls" and getattr(headless, "cls_token", None) is None:
        raise ModelError("this encoder has no class token; use data.pool=avg")
    wanted = set(headless.state_dict())
    timm_pool = "token" if pool == "cls" else "avg"
    for variant in ({"global_pool": timm_pool}, {"global_pool": timm_pool, "fc_norm": False}):
        kwargs = {**source.timm_kwargs(image_size), "num_classes": num_classes, **variant}
        try:
            model = source.create(random_init=True, seed=seed, **{**kwargs, **extra})
        except ModelError:
            continue
        if set(model.state_dict()) - _head_parameter_names(model) == wanted:
            break
    else:
        raise ModelError(f"cannot give {source.card['timm_name']} a head on {pool} pooling")
    if not random_init:
        load_all_but_head(model, fit_position_embeddings(model, source.load_weights()))
    head = model.get_classifier()
    if isinstance(head, nn.Linear):  # MAE finetuning: a near-zero head leaves features intact
        nn.init.trunc_normal_(head.weight, std=2e-5)
        nn.init.zeros_(head.bias)
    return model.train(), kwargs


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over parameter and buffer names, dtypes, shapes and bytes (a feature cache key)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_run_objective(
    run_dir: Path, name: str, random_init: bool, seed: int | None = None, needed_by: str = "this"
):
    """(objective, run config): the `name` objective of a pretraining run directory in eval mode,
    with its last checkpoint loaded, or freshly initialised with the run's seed (the baseline).
    A CLIP run's warm start (clip.text_init) is not applied: the checkpoint holds its weights,
    and the baseline stays random."""
    from pretrain.checkpoint import latest_checkpoint, load_checkpoint
    from pretrain.config import load_config
    from pretrain.objectives import build_objective

    config = load_config(Path(run_dir) / "config.yaml")
    if config.objective.name != name:
        raise ConfigError(
            f"{needed_by} needs a run of the {name} objective (objective.name: {name}); "
            f"{run_dir} was trained with '{config.objective.name}'"
        )
    if name == "clip":
        config.clip.text_init = ""
    torch.manual_seed(config.train.seed if seed is None else seed)
    objective, _ = build_objective(config)
    if not random_init:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError(f"{run_dir} holds no checkpoint to load")
        objective.load_state_dict(load_checkpoint(checkpoint)[0])
    return objective.eval(), config
