"""Sample transforms: decoded sample dict -> dict of tensors and plain values, one sample at a time.

The reader hands each transform {"image": PIL RGB image, "key": str, "label": int (if labelled),
"caption": str (if captioned)} and batches whatever comes back. Objectives that need more than
one image view (SimCLR) or token ids (CLIP) write their own transform with the same interface;
the reader keeps "key" even when a transform drops it.

Random transforms draw from the global torch RNG; the reader seeds it per sample, so the same
(seed, epoch, rank, position) always gives the same crop.
"""

from collections.abc import Callable, Sequence

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageTransform:
    """Applies an image transform to sample["image"]; passes "label" through when present.

    A class rather than a closure so it pickles (DataLoader workers may be spawned).
    """

    def __init__(self, image_transform: Callable):
        self.image_transform = image_transform

    def __call__(self, sample: dict) -> dict:
        out = {"image": self.image_transform(sample["image"])}  # image: [3, H, W] float
        if "label" in sample:
            out["label"] = sample["label"]
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.image_transform})"


def mae_train_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = (0.2, 1.0),
) -> ImageTransform:
    """MAE pretraining augmentation: random resized crop (bicubic), horizontal flip, normalize."""
    return ImageTransform(
        T.Compose(
            [
                T.RandomResizedCrop(
                    image_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC
                ),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    )


def eval_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_fraction: float = 1.0,
) -> ImageTransform:
    """Resize the shorter side to image_size / crop_fraction (bicubic), centre crop, normalize.

    crop_fraction 1.0 (default) suits small images that are already image_size (CIFAR, demo):
    they pass unchanged, as Resize returns an image of the target size as it is. ImageNet-style
    evaluation uses 0.875 (resize 256, crop 224).
    """
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return ImageTransform(
        T.Compose(
            [
                T.Resize(
                    round(image_size / crop_fraction), interpolation=T.InterpolationMode.BICUBIC
                ),
                T.CenterCrop(image_size),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    )
