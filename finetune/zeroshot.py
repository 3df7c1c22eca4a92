"""CLIP zero-shot classification and image-text retrieval.

    class names --templates--> prompts --tokenize, text tower--> [C, T_prompts, D]
    --mean over templates, L2-normalise--> class embeddings [C, D]
    images --image tower--> [N, D] --cosine with class embeddings--> scores [N, C]

    caption shards: images [N, D] x captions [N, D] --cosine--> [N, N]: recall@k both ways

The core works on tensors and callables, so it runs without a trained CLIP model; `load_clip`
turns a CLIP run directory into the callables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune.encoder import weights_fingerprint
from finetune.features import job_features
from finetune.job import Job
from finetune.metrics import topk_accuracy
from pretrain.errors import ConfigError, DataError


@torch.no_grad()
def class_embeddings(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """One L2-normalised embedding per class [C, D]: the mean of its normalised prompt
    embeddings ("a photo of a {}." x class name), as in CLIP's prompt ensembling."""
    prompts = [template.format(name) for name in class_names for template in templates]
    tokens = tokenize(prompts).to(device)  # [C * T, L]
    embedded = F.normalize(encode_text(tokens).float(), dim=-1)  # [C * T, D]
    per_class = embedded.view(len(class_names), len(templates), -1).mean(dim=1)  # [C, D]
    return F.normalize(per_class, dim=-1)


def zero_shot_scores(image_features: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [N, C] of images [N, D] to class embeddings [C, D]."""
    return F.normalize(image_features.float(), dim=-1) @ class_embeds.float().T


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    text_groups: torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@k for image->text and text->image; row i of each is a matching pair.

    image_features [N, D], text_features [N, D]. text_groups [N] (optional): pairs whose
    captions are the same string share a group id, and retrieving any caption of the group
    counts as a hit (a caption repeated for several images is not a miss for all but one).
    """
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)
    similarity = images @ texts.T  # [N images, N texts]
    groups = torch.arange(len(images)) if text_groups is None else text_groups.long()
    result = {}
    for k in ks:
        k_eff = min(k, len(images))
        retrieved_texts = similarity.topk(k_eff, dim=1).indices  # [N, k]: per image
        retrieved_images = similarity.T.topk(k_eff, dim=1).indices  # [N, k]: per text
        image_to_text = (groups[retrieved_texts] == groups[:, None]).any(dim=1)
        text_to_image = (groups[retrieved_images] == groups[:, None]).any(dim=1)
        result[f"image_to_text_r{k}"] = image_to_text.sum().item() / len(images)
        result[f"text_to_image_r{k}"] = text_to_image.sum().item() / len(images)
    return result


def caption_groups(captions: Sequence[str]) -> torch.Tensor:
    """[N] ids, equal for equal caption strings."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(text, len(ids)) for text in captions])


@torch.no_grad()
def encode_texts(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    batch_size: int,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """[N, D] text embeddings, in batches."""
    parts = [
        encode_text(tokenize(list(texts[start : start + batch_size])).to(device)).float().cpu()
        for start in range(0, len(texts), batch_size)
    ]
    return torch.cat(parts)


def load_clip(run_dir: Path, random_init: bool, seed: int | None = None):
    """The CLIP objective of a run directory, in eval mode, with its last checkpoint loaded
    (or freshly initialised, for the baseline). Needs objective.name == "clip"."""
    from pretrain.checkpoint import latest_checkpoint, load_checkpoint
    from pretrain.config import load_config
    from pretrain.objectives import build_objective

    config = load_config(Path(run_dir) / "config.yaml")
    if config.objective.name != "clip":
        raise ConfigError(
            f"zeroshot needs a CLIP run (objective.name: clip); {run_dir} was trained with "
            f"'{config.objective.name}'"
        )
    config.clip.text_init = ""  # a warm start's weights are in the checkpoint; a baseline is random
    torch.manual_seed(config.train.seed if seed is None else seed)
    objective, _ = build_objective(config)
    if not random_init:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ConfigError(f"{run_dir} holds no checkpoint to load")
        objective.load_state_dict(load_checkpoint(checkpoint)[0])
    for name in ("encode_image", "encode_text", "tokenize"):
        if not callable(getattr(objective, name, None)):
            raise ConfigError(f"the clip objective has no {name}(); zeroshot cannot use it")
    return objective.eval(), config


def run_zeroshot(job: Job, random_init: bool) -> dict | None:
    """`finetune zeroshot`: class prompts against the val images (labelled shards with class
    names) and retrieval both ways (captioned shards); the result (main process)."""
    data, accelerator = job.config.data, job.accelerator
    clip, run_config = load_clip(job.source.run_dir, random_init)
    clip.to(accelerator.device)
    image_size = data.image_size or run_config.data.image_size
    identity = {"weights": weights_fingerprint(clip), "tower": "clip.encode_image"}
    val, cached = job_features(job, clip.encode_image, identity, "val", image_size, "clip images")
    if not accelerator.is_main_process:
        return None
    report = job.report(random_init)
    result = {**job.describe(random_init), "val_samples": len(val), "features_cached": cached}
    with torch.no_grad(), accelerator.autocast():
        if val.labels is not None and job.class_names:
            result.update(_classify(job, clip, val, report, random_init))
        if val.captions:
            settings, device = job.config.zeroshot, accelerator.device
            texts = encode_texts(
                clip.encode_text, clip.tokenize, val.captions, settings.text_batch_size, device
            )
            result.update(
                retrieval_recall(val.features, texts, text_groups=caption_groups(val.captions))
            )
    if "top1" not in result and "image_to_text_r1" not in result:
        raise DataError(
            "the val shards carry neither class labels with class names (--classes) nor "
            "captions (txt): nothing to evaluate zero-shot"
        )
    report.finish(result)
    return result


def _classify(job: Job, clip, val, report, random_init: bool) -> dict:
    """Zero-shot top-1/top-5 of the val images against the class prompts, and the confusion."""
    classes, device = len(job.class_names), job.accelerator.device
    if int(val.labels.max()) >= classes:
        raise DataError(
            f"the val labels go up to {int(val.labels.max())} but only {classes} class names "
            "are known"
        )
    templates = job.config.zeroshot.templates
    embeds = class_embeddings(clip.encode_text, clip.tokenize, job.class_names, templates, device)
    scores = zero_shot_scores(val.features.to(device), embeds).float().cpu()  # [N, C]
    title = job.title("zero-shot", random_init)
    return {
        "top1": topk_accuracy(scores, val.labels, 1),
        "top5": topk_accuracy(scores, val.labels, 5),
        "num_classes": classes,
        "templates": list(templates),
        **report.confusion(scores, val.labels, classes, job.class_names, title),
    }
