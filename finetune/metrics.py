"""Classification metrics of every mode, and the confusion-matrix picture they share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores; scores [N, C], labels [N]."""
    k = min(k, scores.shape[-1])
    hits = (scores.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)
    return hits.sum().item() / max(1, len(labels))


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """[C, C] counts: row = true class, column = predicted class."""
    flat = labels.long() * classes + predictions.long()
    return torch.bincount(flat, minlength=classes * classes).view(classes, classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Recall of each class (None for a class absent from the labels)."""
    totals = confusion.sum(dim=1)
    return [
        None if total == 0 else confusion[row, row].item() / total.item()
        for row, total in enumerate(totals)
    ]


CELL_MAX, LABEL_CLASSES = 28, 40  # biggest cell in pixels; classes up to which names are drawn


def draw_confusion(
    confusion: torch.Tensor, class_names: Sequence[str] | None, path: str | Path, title: str
) -> Path:
    """A PNG of the row-normalised confusion matrix (white 0 -> dark blue 1).

    Up to LABEL_CLASSES classes each row is labelled with its name and per-class accuracy; for
    more classes (ImageNet) the matrix alone, one or a few pixels per cell.
    """
    classes = confusion.shape[0]
    names = list(class_names) if class_names else [str(number) for number in range(classes)]
    names += [str(number) for number in range(len(names), classes)]
    rows = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp(min=1)  # [C, C] in [0, 1]
    cell = max(1, min(CELL_MAX, 800 // classes))
    labelled = classes <= LABEL_CLASSES
    font = ImageFont.load_default(size=max(9, min(14, cell - 4)) if labelled else 12)
    accuracy = per_class_accuracy(confusion)
    row_labels = [
        f"{name} {'-' if acc is None else f'{100 * acc:.0f}%'}"
        for name, acc in zip(names, accuracy)
    ]
    left = 8 + max(font.getbbox(text)[2] for text in row_labels) if labelled else 8
    top = 44
    width = max(left + classes * cell + 8, 8 + font.getbbox(title)[2] + 8, 260)
    image = Image.new("RGB", (width, top + classes * cell + 8), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 4), title, fill="black", font=font)
    draw.text((8, 22), "row: true class (recall), column: predicted", fill="gray", font=font)
    # Blend white (255, 255, 255) towards (8, 48, 107) by the row-normalised count.
    shade = (255 - rows[..., None] * torch.tensor([247.0, 207.0, 148.0])).round().to(torch.uint8)
    cells = Image.fromarray(shade.numpy(), "RGB").resize(
        (classes * cell, classes * cell), Image.Resampling.NEAREST
    )
    image.paste(cells, (left, top))
    if labelled:
        for row, text in enumerate(row_labels):
            draw.text((4, top + row * cell + (cell - 12) // 2), text, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
