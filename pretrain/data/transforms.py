"""Sample transforms: decoded sample dict -> dict of tensors and plain values, one sample at a time.

Every transform the loaders run lives here; each objective's file only picks one and its
settings (its `train_transform` factory). The reader hands each transform {"image": PIL RGB
image, "key": str, "label": int (if labelled), "caption": str and "captions": list[str] (if
captioned: the first, and all of the image's captions)} and batches
whatever comes back; it keeps "key" even when a transform drops it. A transform may define
`finish_batch(batch)` for work done once per collated batch (normalizing uint8 crops), and
`needs_image = False` when it reads the caption only: the reader then skips decoding the image
(no "image" in the sample).

Random transforms draw from the global torch RNG; the reader seeds it per sample, so the same
(seed, epoch, rank, position) always gives the same crop.
"""

import random
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from pretrain.data.samples import mix_seeds
from pretrain.data.view_params import (
    CROP_DRAWS,
    PARAM_DRAWS,
    blur_probability,
    draw_view_params,
    jitter_groups,
    random_crop_box,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_ASPECT_RATIOS = (3 / 4, 4 / 3)  # RandomResizedCrop's default range
VIEW_DRAWS = CROP_DRAWS + 1 + PARAM_DRAWS  # uniforms one SimCLR view uses: crop, flip, colours


def normalize_pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 normalized with per-channel mean and std ([3] each)."""
    return (images.float().div_(255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def normalize_batch(
    batch: dict, keys: Sequence[str], mean: Sequence[float], std: Sequence[float]
) -> dict:
    """batch[key] uint8 [B, 3, H, W] -> float32 normalized, for each key, the whole batch at once
    (per image, ToTensor + Normalize cost more than the crop itself at 32 px)."""
    mean_tensor, std_tensor = torch.tensor(mean), torch.tensor(std)
    for key in keys:
        batch[key] = normalize_pixels(batch[key], mean_tensor, std_tensor)
    return batch


class ImageTransform:
    """Applies an image transform to sample["image"]; passes "label" through when present.

    With `normalize=(mean, std)` the image transform returns uint8 and the reader normalizes the
    collated batch (finish_batch), so batches hold float32 normalized images either way.
    A class rather than a closure so it pickles (DataLoader workers may be spawned).
    """

    def __init__(
        self,
        image_transform: Callable,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    ):
        self.image_transform = image_transform
        self.normalize = normalize

    def __call__(self, sample: dict) -> dict:
        out = {"image": self.image_transform(sample["image"])}  # [3, H, W], float or uint8
        if "label" in sample:
            out["label"] = sample["label"]
        return out

    def finish_batch(self, batch: dict) -> dict:
        if self.normalize is None:
            return batch
        return normalize_batch(batch, ["image"], *self.normalize)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.image_transform}, normalize={self.normalize})"


class CropFlip:
    """Random resized crop and horizontal flip: PIL image -> uint8 [3, size, size].

    One PIL resize with a source box does the crop and the resize; the result stays uint8 and
    is normalized a batch at a time (ImageTransform.finish_batch), which costs the loader much
    less than torchvision's crop, ToTensor and Normalize per image (benchmarks/README.md).
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.08, 1.0),
        interpolation: Image.Resampling = Image.Resampling.BILINEAR,
        flip_p: float = 0.5,
    ):
        self.size = size
        self.scale = tuple(scale)
        self.interpolation = interpolation
        self.flip_p = flip_p

    def __call__(self, image: Image.Image, draws: Sequence[float] | None = None) -> torch.Tensor:
        """draws: CROP_DRAWS + 1 uniforms (crop, then flip); drawn here when not given."""
        if draws is None:
            draws = torch.rand(CROP_DRAWS + 1).tolist()
        box = random_crop_box(*image.size, self.scale, CROP_ASPECT_RATIOS, draws[:CROP_DRAWS])
        left, top, width, height = box
        view = image.resize(
            (self.size, self.size), self.interpolation, box=(left, top, left + width, top + height)
        )
        if draws[CROP_DRAWS] < self.flip_p:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(view).copy()).permute(2, 0, 1)  # HWC -> CHW

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale={self.scale}, "
            f"interpolation={self.interpolation.name}, flip_p={self.flip_p})"
        )


def mae_train_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = (0.2, 1.0),
) -> ImageTransform:
    """MAE pretraining augmentation: random resized crop (bicubic), horizontal flip, normalize
    (per batch)."""
    return ImageTransform(CropFlip(image_size, scale, Image.Resampling.BICUBIC), (mean, std))


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


def generative_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> ImageTransform:
    """Resize and centre-crop to image_size, random horizontal flip, normalize.

    Reconstruction and generative objectives learn the image distribution itself, so they get
    no augmentation beyond a flip (which leaves that distribution unchanged for natural images).
    """
    return ImageTransform(
        T.Compose(
            [
                T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(image_size),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    )


class SimCLRViews:
    """SimCLR sample transform (Chen et al., 2020, appendix A), the loader's half: two random
    resized crops with horizontal flips (uint8 [3, H, W] per sample, normalized float32 per
    batch) and each view's colour parameters ([VIEW_PARAMS] float32, "view_params" and
    "view_params2"). The colour jitter, grayscale and blur are applied batched on the training
    device by the objective (pretrain/models/color_augment.py): in PIL, per image, they starved
    the training step on a small CPU.

    Each view takes VIEW_DRAWS uniforms in one call of the torch RNG (seeded per sample by the
    reader): crop, flip, colour parameters; view 1 first.
    """

    def __init__(
        self,
        image_size: int,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        flip_p: float = 0.5,
        color_jitter: Sequence[float] = (0.8, 0.8, 0.8, 0.2),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float | None = None,
    ):
        self.image_size = image_size
        self.crop_flip = CropFlip(image_size, crop_scale, Image.Resampling.BILINEAR, flip_p)
        self.color_jitter = tuple(color_jitter)
        self.color_jitter_p = color_jitter_p
        self.grayscale_p = grayscale_p
        self.blur_p = blur_probability(image_size, blur_p)

    def view(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        draws = torch.rand(VIEW_DRAWS).tolist()  # crop, flip, colours: one RNG call per view
        pixels = self.crop_flip(image, draws[: CROP_DRAWS + 1])
        params = draw_view_params(
            self.color_jitter,
            self.color_jitter_p,
            self.grayscale_p,
            self.blur_p,
            draws[CROP_DRAWS + 1 :],
        )
        return pixels, params

    def finish_batch(self, batch: dict) -> dict:
        """Normalizes both views and adds the colour-op groups of the 2B views in the order the
        objective stacks them (image, then image2): "view_jitter_rows" [4, 2B] and
        "view_jitter_sizes" (a list, so it stays on the host)."""
        batch = normalize_batch(batch, ["image", "image2"], IMAGENET_MEAN, IMAGENET_STD)
        params = torch.cat([batch["view_params"], batch["view_params2"]])
        batch["view_jitter_rows"], batch["view_jitter_sizes"] = jitter_groups(params)
        return batch

    def __call__(self, sample: dict) -> dict:
        image, params = self.view(sample["image"])
        image2, params2 = self.view(sample["image"])  # another, independent draw
        out = {"image": image, "view_params": params, "image2": image2, "view_params2": params2}
        if "label" in sample:
            out["label"] = sample["label"]
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.crop_flip}, color_jitter={self.color_jitter}, "
            f"color_jitter_p={self.color_jitter_p}, grayscale_p={self.grayscale_p}, "
            f"blur_p={self.blur_p})"
        )


class ImageText:
    """CLIP sample transform: the image, and one of its captions as token ids [T] (int64).

    An image with several captions gets one drawn per sample, from python's RNG after the
    image's crop (the reader seeds both per sample, so a resumed run draws the same captions);
    an image with one caption draws nothing, which keeps single-caption runs as they were.
    Samples without a caption (plain ImageFolder shards) fail loudly rather than training on
    empty text: shard them with a caption template (`pretrain shards imagefolder
    --caption-template "a photo of a {}."`).
    """

    def __init__(self, image_transform: Callable, tokenizer: Callable):
        self.image_transform = image_transform
        self.tokenizer = tokenizer

    def __call__(self, sample: dict) -> dict:
        captions = sample.get("captions") or [
            sample[name] for name in ("caption",) if name in sample
        ]
        if not captions:
            raise ValueError(f"sample {sample.get('key')} has no caption (txt); CLIP needs one")
        image = self.image_transform(sample["image"])  # [3, H, W]
        caption = captions[0] if len(captions) == 1 else captions[random.randrange(len(captions))]
        out = {"image": image, "text": self.tokenizer([caption])[0]}  # [T] ids, zero padded
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


# ----------------------------------------------------------------------------------------------
# Masked language modelling (BERT): captions only, no image

IGNORE_INDEX = -100  # a target that is not predicted (torch cross_entropy's default ignore_index)


def bert_mask(
    tokens: torch.Tensor,
    mask_id: int,
    end_id: int,
    special_ids: Sequence[int],
    random_ids: tuple[int, int],
    choose: float = 0.15,
    to_mask: float = 0.8,
    to_random: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption (Devlin et al., 2019): token ids [B, T] -> (inputs [B, T], targets [B, T]).

    Candidates are the tokens before each row's end token that are not special (start, end);
    the end token and the padding after it never are. Each candidate is chosen with probability
    `choose`, independently; a chosen token becomes the mask token with probability `to_mask`,
    a token drawn uniformly from random_ids = [low, high) with probability `to_random`, and
    stays itself otherwise. targets holds the original id at chosen positions, IGNORE_INDEX
    elsewhere. Draws, in this order: choice and corruption uniforms [2, B, T], random ids [B, T].
    """
    after_end = (tokens == end_id).cumsum(dim=1) > 0  # [B, T]: the end token and the padding
    special = torch.isin(tokens, torch.tensor(list(special_ids), dtype=tokens.dtype))
    candidate = ~after_end & ~special  # [B, T]
    choice, corruption = torch.rand(2, *tokens.shape, generator=generator)  # [B, T] each
    chosen = candidate & (choice < choose)
    masked = chosen & (corruption < to_mask)
    randomized = chosen & (corruption >= to_mask) & (corruption < to_mask + to_random)
    random_tokens = torch.randint(*random_ids, tokens.shape, generator=generator)
    inputs = torch.where(masked, mask_id, tokens)
    inputs = torch.where(randomized, random_tokens, inputs)
    targets = torch.where(chosen, tokens, IGNORE_INDEX)
    return inputs, targets


class MaskedCaption:
    """Masked-language sample transform: the caption's token ids, BERT-corrupted ("text" [T]
    int64) and the ids to predict ("text_targets" [T], IGNORE_INDEX where nothing is predicted).

    Text only: `needs_image = False` tells the reader not to decode the image. In training the
    draws come from the reader's per-sample seeded RNG; with `key_seed` (evaluation) from a
    generator seeded by (key_seed, sample key), so a caption's mask never depends on the batch,
    the process count or the model under test.
    """

    needs_image = False

    def __init__(self, tokenizer: Callable, masking: dict, key_seed: int | None = None):
        self.tokenizer = tokenizer  # CaptionTokenizer: ids, and start/end/pad/mask ids
        self.masking = masking  # bert_mask's choose, to_mask, to_random
        self.key_seed = key_seed

    def __call__(self, sample: dict) -> dict:
        if "caption" not in sample:
            raise ValueError(f"sample {sample.get('key')} has no caption (txt); mlm needs one")
        tokens = self.tokenizer([sample["caption"]])  # [1, T]
        generator = None
        if self.key_seed is not None:
            key = zlib.crc32(sample["key"].encode())
            generator = torch.Generator().manual_seed(mix_seeds(self.key_seed, key))
        tok = self.tokenizer
        inputs, targets = bert_mask(
            tokens,
            mask_id=tok.mask_id,
            end_id=tok.end_id,
            special_ids=(tok.start_id, tok.end_id),
            # random replacements: real BPE ids, above the padding id 0 (which attention
            # ignores) and below the special ids (start, end, mask)
            random_ids=(tok.pad_id + 1, tok.start_id),
            generator=generator,
            **self.masking,
        )
        out = {"text": inputs[0], "text_targets": targets[0]}
        if "label" in sample:
            out["label"] = sample["label"]
        return out
