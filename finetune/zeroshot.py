"""CLIP zero-shot classification and image-text retrieval.

    class names --templates--> prompts --tokenize, text tower--> [C, T_prompts, D]
    --mean over templates, L2-normalise--> class embeddings [C, D]
    images --image tower--> [N, D] --cosine with class embeddings--> scores [N, C]

    caption shards: unique images [N, D] x all their captions [T, D] --cosine--> [N, T]:
    recall@k both ways (an image's hit: any of its captions; a caption's hit: its image)

The core works on tensors and callables, so it runs without a trained CLIP model; `load_clip`
turns a CLIP run directory into the callables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune.encoder import load_run_objective, weights_fingerprint
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
    text_image: torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@k for image->text and text->image over N unique images and T captions, the
    standard image-text retrieval protocol (each image with one or several captions).

    image_features [N, D], text_features [T, D]. text_image [T]: the image each caption belongs
    to (default: caption i is image i's, T == N). An image query is a hit when any of its
    captions is among the k captions most similar to it; a caption query when its image is
    among the k most similar images. Recall is the share of hits over the N image queries and
    the T caption queries. text_groups [T] (optional): captions that are the same string share
    an id, and such a caption belongs to every image that has it (a class-name caption such as
    "a photo of a cat." repeated for many images is not a miss for all but one).
    """
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1)
    owner = torch.arange(len(texts)) if text_image is None else text_image.long()
    groups = torch.arange(len(texts)) if text_groups is None else text_groups.long()
    image_groups = _groups_per_image(owner, groups, len(images))  # [N, M], -1 padded
    similarity = images @ texts.T  # [N images, T texts]
    result = {}
    for k in ks:
        retrieved_texts = similarity.topk(min(k, len(texts)), dim=1).indices  # [N, k]
        retrieved_images = similarity.T.topk(min(k, len(images)), dim=1).indices  # [T, k]
        # [N, k, M]: does a retrieved caption's string belong to the querying image?
        image_to_text = (groups[retrieved_texts][:, :, None] == image_groups[:, None, :]).any(
            dim=(1, 2)
        )
        # [T, k, M]: does a retrieved image own the querying caption's string?
        text_to_image = (image_groups[retrieved_images] == groups[:, None, None]).any(dim=(1, 2))
        result[f"image_to_text_r{k}"] = image_to_text.sum().item() / len(images)
        result[f"text_to_image_r{k}"] = text_to_image.sum().item() / len(texts)
    return result


def _groups_per_image(owner: torch.Tensor, groups: torch.Tensor, num_images: int) -> torch.Tensor:
    """[N, M] caption groups of each image (M: the most captions an image has), -1 padded."""
    counts = torch.bincount(owner, minlength=num_images)  # [N]
    order = torch.argsort(owner, stable=True)  # captions grouped by image
    starts = torch.cumsum(counts, 0) - counts  # [N]: first slot of each image in `order`
    slot = torch.arange(len(owner)) - starts[owner[order]]  # position within its image
    table = torch.full((num_images, max(1, int(counts.max()))), -1, dtype=torch.long)
    table[owner[order], slot] = groups[order]
    return table


def flatten_captions(captions: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Every image's captions -> (all T captions, the image index of each [T])."""
    texts = [text for image_captions in captions for text in image_captions]
    owners = [image for image, image_captions in enumerate(captions) for _ in image_captions]
    return texts, torch.tensor(owners, dtype=torch.long)


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
    (or freshly initialised, for the baseline)."""
    objective, config = load_run_objective(run_dir, "clip", random_init, seed, "zeroshot")
    for name in ("encode_image", "encode_text", "tokenize"):
        if not callable(getattr(objective, name, None)):
            raise ConfigError(f"the clip objective has no {name}(); zeroshot cannot use it")
    return objective, config


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
            result.update(_retrieve(job, clip, val))
    if "top1" not in result and "image_to_text_r1" not in result:
        raise DataError(
            "the val shards carry neither class labels with class names (--classes) nor "
            "captions (txt): nothing to evaluate zero-shot"
        )
    report.finish(result)
    return result


def _retrieve(job: Job, clip, val) -> dict:
    """Image-text recall@1/5 both ways over the unique val images and all their captions."""
    settings, device = job.config.zeroshot, job.accelerator.device
    captions, owners = flatten_captions(val.captions)
    texts = encode_texts(
        clip.encode_text, clip.tokenize, captions, settings.text_batch_size, device
    )
    recall = retrieval_recall(
        val.features, texts, text_groups=caption_groups(captions), text_image=owners
    )
    return {**recall, "val_captions": len(captions)}


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
