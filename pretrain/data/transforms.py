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


def simclr_view_transform(
    image_size: int,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    flip_p: float = 0.5,
    color_jitter: Sequence[float] = (0.8, 0.8, 0.8, 0.2),
    color_jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
    blur_p: float | None = None,
    blur_kernel_fraction: float = 0.1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable:
    """One SimCLR view (Chen et al., 2020, appendix A): PIL image -> [3, H, W] float.

    blur_p None picks the paper's choice by image size: blur for ImageNet-sized images, none
    for 32 px images (CIFAR), where a 3-pixel kernel only destroys what little detail there is.
    """
    if blur_p is None:
        blur_p = 0.5 if image_size > 32 else 0.0
    steps = [
        T.RandomResizedCrop(image_size, scale=tuple(crop_scale)),
        T.RandomHorizontalFlip(flip_p),
        T.RandomApply([T.ColorJitter(*color_jitter)], p=color_jitter_p),
        T.RandomGrayscale(grayscale_p),
    ]
    if blur_p > 0:
        kernel = max(3, int(image_size * blur_kernel_fraction) // 2 * 2 + 1)  # odd
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class TwoViews:
    """SimCLR sample transform: two independent augmentations of the same image."""

    def __init__(self, view_transform: Callable):
        self.view_transform = view_transform

    def __call__(self, sample: dict) -> dict:
        out = {
            "image": self.view_transform(sample["image"]),  # [3, H, W]
            "image2": self.view_transform(sample["image"]),  # [3, H, W], another draw
        }
        if "label" in sample:
            out["label"] = sample["label"]
        return out


class ImageText:
    """CLIP sample transform: the image, and the caption as token ids [T] (int64).

    Samples without a caption (plain ImageFolder shards) fail loudly rather than training on
    empty text: shard them with a caption template (`pretrain shards imagefolder
    --caption-template "a photo of a {}."`).
    """

    def __init__(self, image_transform: Callable, tokenizer: Callable):
        self.image_transform = image_transform
        self.tokenizer = tokenizer

    def __call__(self, sample: dict) -> dict:
        if "caption" not in sample:
            raise ValueError(f"sample {sample.get('key')} has no caption (txt); CLIP needs one")
        out = {
            "image": self.image_transform(sample["image"]),  # [3, H, W]
            "text": self.tokenizer([sample["caption"]])[0],  # [T] token ids, zero padded
        }
        if "label" in sample:
            out["label"] = sample["label"]
        return out


def clip_image_transform(
    image_size: int,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable:
    """Light random crops only (as in CLIP/open_clip training): the caption must stay true."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                image_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC
            ),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
