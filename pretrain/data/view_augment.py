"""SimCLR's colour augmentations, split so that the expensive part runs batched on the device.

Per image, in the loader (cheap): `draw_view_params` draws the random choices of one view
(whether colour jitter applies, its four factors and their order, grayscale, blur sigma) from
the torch RNG, which the reader seeds per sample, so resumed runs see the same augmentations.
Per batch, in the objective (on the GPU when there is one): `augment_views` applies them to the
normalized crops. On a 2-core CPU this took SimCLR's per-image transform in the loader from
2.3 ms (PIL, colour jitter most of it) to about 0.2 ms; the step pays about 0.1 ms a view.

The maths follows torchvision's tensor ops (ColorJitter, RandomGrayscale, GaussianBlur), with
the factors given per image instead of per call; tests/test_view_augment.py checks each op
against torchvision image by image.

Shapes: N images (views) in the batch, [N, 3, H, W]; params [N, VIEW_PARAMS].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Layout of one view's parameter row (float32).
JITTER_APPLIED = 0  # 1.0 when colour jitter applies (the factors below are then drawn)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 1, 2, 3, 4  # identity: 1, 1, 1, 0
ORDER = slice(5, 9)  # a permutation of (0, 1, 2, 3) = brightness, contrast, saturation, hue
GRAYSCALE = 9  # 1.0: convert to gray (3 equal channels)
BLUR_SIGMA = 10  # 0.0: no blur
VIEW_PARAMS = 11

IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue factors that change nothing
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision
BLUR_SIGMA_RANGE = (0.1, 2.0)  # SimCLR appendix A


def blur_probability(image_size: int, blur_p: float | None) -> float:
    """blur_p None picks the paper's choice by image size: blur for ImageNet-sized images, none
    for 32 px images (CIFAR), where a 3-pixel kernel only destroys what little detail there is."""
    if blur_p is None:
        return 0.5 if image_size > 32 else 0.0
    return blur_p


def blur_kernel_size(image_size: int, fraction: float) -> int:
    """Odd kernel side, about `fraction` of the image side, at least 3 (23 at 224 px)."""
    return max(3, int(image_size * fraction) // 2 * 2 + 1)


CROP_ATTEMPTS = 10
CROP_DRAWS = 4 * CROP_ATTEMPTS  # uniforms one random_crop_box uses
PARAM_DRAWS = 12  # uniforms one draw_view_params uses


def random_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    draws: Sequence[float] | None = None,
) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of a random resized crop: an area fraction uniform in
    `scale` and an aspect ratio log-uniform in `ratio`, retried up to CROP_ATTEMPTS times until
    the crop fits, else the whole image cut to the nearest allowed ratio (as torchvision's
    RandomResizedCrop). draws: CROP_DRAWS uniforms in [0, 1), drawn here when not given (the
    loader draws everything a view needs in one call: each torch call costs microseconds)."""
    if draws is None:
        draws = torch.rand(CROP_DRAWS).tolist()
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(CROP_ATTEMPTS):
        area_draw, ratio_draw, top_draw, left_draw = draws[4 * attempt : 4 * attempt + 4]
        area = width * height * (scale[0] + (scale[1] - scale[0]) * area_draw)
        aspect = math.exp(log_low + (log_high - log_low) * ratio_draw)
        crop_width, crop_height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(top_draw * (height - crop_height + 1))
            left = int(left_draw * (width - crop_width + 1))
            return left, top, crop_width, crop_height
    crop_width, crop_height = width, height
    if width / height < ratio[0]:
        crop_height = round(width / ratio[0])
    elif width / height > ratio[1]:
        crop_width = round(height * ratio[1])
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def draw_view_params(
    color_jitter: Sequence[float],
    color_jitter_p: float,
    grayscale_p: float,
    blur_p: float,
    draws: Sequence[float] | None = None,
) -> torch.Tensor:
    """One view's random choices, [VIEW_PARAMS] float32, from PARAM_DRAWS uniforms in [0, 1)
    (drawn here from the global torch RNG when not given).

    color_jitter = (brightness, contrast, saturation, hue) strengths as torchvision's
    ColorJitter takes them: factors uniform in [max(0, 1 - s), 1 + s], hue in [-h, h]; the op
    order is the argsort of four uniforms (a uniform random permutation).
    """
    if draws is None:
        draws = torch.rand(PARAM_DRAWS).tolist()
    apply_jitter, *factor_draws, hue_draw, apply_gray, apply_blur, sigma_draw = draws[:8]
    values = [0.0, *IDENTITY, 0.0, 1.0, 2.0, 3.0, 0.0, 0.0]
    if apply_jitter < color_jitter_p:
        values[JITTER_APPLIED] = 1.0
        for offset, (strength, draw) in enumerate(zip(color_jitter[:3], factor_draws)):
            low, high = max(0.0, 1.0 - strength), 1.0 + strength
            values[BRIGHTNESS + offset] = low + (high - low) * draw
        values[HUE] = color_jitter[3] * (2 * hue_draw - 1)
        order_draws = draws[8:12]
        values[ORDER] = sorted(range(4), key=order_draws.__getitem__)
    if apply_gray < grayscale_p:
        values[GRAYSCALE] = 1.0
    if apply_blur < blur_p:
        low, high = BLUR_SIGMA_RANGE
        values[BLUR_SIGMA] = low + (high - low) * sigma_draw
    return torch.tensor(values, dtype=torch.float32)


def normalize_pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 normalized with per-channel mean and std ([3] each)."""
    return (images.float().div_(255) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Batched ops on float images in [0, 1], one factor per image ([N])


def _per_image(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)  # [N] -> [N, 1, 1, 1], broadcasts over C, H, W


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma."""
    red, green, blue = images.unbind(1)
    return (GRAY_WEIGHTS[0] * red + GRAY_WEIGHTS[1] * green + GRAY_WEIGHTS[2] * blue).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * images + (1 - factor) * other, clamped to [0, 1] (torchvision's _blend)."""
    factor = _per_image(factor)
    return (factor * images + (1 - factor) * other).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_image(factor)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean_luma = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)  # [N, 1, 1, 1]
    return _blend(images, mean_luma, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates each pixel's HSV hue by shift (a fraction of a turn, [N]); value and saturation
    stay. Written through chroma instead of a full HSV round trip: a pixel's max and min channel
    stay, and channel n becomes max - chroma * clamp(min(k, 4 - k), 0, 1) with
    k = (n + hue in sixths) mod 6, n = 5, 3, 1 for red, green, blue."""
    largest = images.amax(dim=1)  # [N, H, W]
    chroma = largest - images.amin(dim=1)  # [N, H, W]
    red, green, blue = images.unbind(1)
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # hue in sixths of a turn, [0, 6); ties go to red, then green, as in torchvision
    hue = torch.where(
        largest == red,
        ((green - blue) / safe_chroma) % 6,
        torch.where(
            largest == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4
        ),
    )
    hue = (hue + 6 * shift.view(-1, 1, 1)) % 6
    channel_offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype)
    k = (channel_offsets.view(1, 3, 1, 1) + hue.unsqueeze(1)) % 6  # [N, 3, H, W]
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    return largest.unsqueeze(1) - chroma.unsqueeze(1) * ramp


COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, one sigma per image ([N]; 0: unchanged)."""
    count, channels, height, width = images.shape
    offsets = torch.arange(kernel_size, device=images.device, dtype=images.dtype)
    offsets = offsets - (kernel_size - 1) / 2
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).to(images.dtype)
    kernels = torch.exp(-0.5 * (offsets / safe_sigma.view(-1, 1)) ** 2)  # [N, K]
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    identity = (offsets == 0).to(images.dtype).expand_as(kernels)
    kernels = torch.where((sigma > 0).view(-1, 1), kernels, identity)
    # one group per (image, channel): [N*3, 1, K, 1] down the rows, [N*3, 1, 1, K] along them
    weights = kernels.repeat_interleave(channels, dim=0).view(count * channels, 1, kernel_size)
    pad = kernel_size // 2
    flat = images.reshape(1, count * channels, height, width)
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, weights.unsqueeze(3), groups=count * channels)
    flat = F.conv2d(flat, weights.unsqueeze(2), groups=count * channels)
    return flat.view(count, channels, height, width)


def jitter_groups(params: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """Which images run which colour op at each of the four positions, from params on the CPU
    ([N, VIEW_PARAMS]): rows [4, N] int64 (per position, the image indices sorted by op, images
    without jitter last) and sizes [4][4] (how many images run op k at position p). The loader's
    worker computes them (SimCLRViews.finish_batch), so the step slices `rows` with bounds the
    host already knows and never waits for the device."""
    jittered = params[:, JITTER_APPLIED] > 0
    none = len(COLOR_OPS)  # sorts after every op
    ops = torch.where(jittered.unsqueeze(1), params[:, ORDER].long(), none)  # [N, 4]
    rows = torch.argsort(ops.T, dim=1, stable=True)  # [4, N]
    sizes = [torch.bincount(ops[:, p], minlength=none + 1)[:none].tolist() for p in range(4)]
    return rows, sizes


def augment_views(
    images: torch.Tensor,
    params: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    blur_kernel: int,
    groups: tuple[torch.Tensor, list[list[int]]],
) -> torch.Tensor:
    """Normalized crops [N, 3, H, W] + params [N, VIEW_PARAMS] -> normalized augmented crops.

    The colour ops work on pixels in [0, 1]: the normalization (mean, std: [3]) is undone first
    and redone last. Colour jitter applies its four ops in each image's own order: at each of the
    four positions, each op runs on the images that have it there (`groups`, from jitter_groups).
    Then grayscale, then blur, as in torchvision's Compose of the SimCLR recipe. blur_kernel 0
    leaves blur out.
    """
    mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    images = (images * std + mean).clamp_(0, 1)
    params = params.to(device=images.device, dtype=images.dtype)
    rows_by_position, sizes = groups
    rows_by_position = rows_by_position.to(images.device, non_blocking=True)
    for position in range(4):
        start = 0
        for op_index, op in enumerate(COLOR_OPS):
            count = sizes[position][op_index]
            rows = rows_by_position[position, start : start + count]
            start += count
            if count:
                images[rows] = op(images[rows], params[rows, BRIGHTNESS + op_index])
    gray = params[:, GRAYSCALE].view(-1, 1, 1, 1) > 0
    images = torch.where(gray, grayscale(images).expand_as(images), images)
    if blur_kernel > 0:
        images = gaussian_blur(images, params[:, BLUR_SIGMA], blur_kernel)
    return (images - mean) / std
