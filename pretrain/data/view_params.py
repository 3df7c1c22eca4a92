"""The random choices of one SimCLR view, drawn per image in the loader (the cheap half of the
SimCLR augmentation; the colour ops themselves run batched on the device, in
pretrain/models/color_augment.py).

`random_crop_box` and `draw_view_params` take uniforms the loader draws in one torch RNG call per
view (the reader seeds that RNG per sample, so resumed runs see the same augmentations);
`draw_view_params` packs whether colour jitter applies, its four factors and their order,
grayscale and blur sigma into one float32 row; `jitter_groups` sorts a batch's views by colour
op so that the device applies each op to a slice whose bounds the host already knows.

Shapes: N views in the batch; params [N, VIEW_PARAMS].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Layout of one view's parameter row (float32).
JITTER_APPLIED = 0  # 1.0 when colour jitter applies (the factors below are then drawn)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 1, 2, 3, 4  # identity: 1, 1, 1, 0
ORDER = slice(5, 9)  # a permutation of (0, 1, 2, 3) = brightness, contrast, saturation, hue
GRAYSCALE = 9  # 1.0: convert to gray (3 equal channels)
BLUR_SIGMA = 10  # 0.0: no blur
VIEW_PARAMS = 11

IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue factors that change nothing
BLUR_SIGMA_RANGE = (0.1, 2.0)  # SimCLR appendix A


def blur_probability(image_size: int, blur_p: float | None) -> float:
    """blur_p None picks the paper's choice by image size: blur for ImageNet-sized images, none
    for 32 px images (CIFAR), where a 3-pixel kernel only destroys what little detail there is."""
    if blur_p is None:
        return 0.5 if image_size > 32 else 0.0
    return blur_p


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


NUM_COLOR_OPS = 4  # brightness, contrast, saturation, hue: ORDER holds a permutation of them


def jitter_groups(params: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """Which images run which colour op at each of the four positions, from params on the CPU
    ([N, VIEW_PARAMS]): rows [4, N] int64 (per position, the image indices sorted by op, images
    without jitter last) and sizes [4][4] (how many images run op k at position p). The loader's
    worker computes them (SimCLRViews.finish_batch), so the step slices `rows` with bounds the
    host already knows and never waits for the device."""
    jittered = params[:, JITTER_APPLIED] > 0
    none = NUM_COLOR_OPS  # sorts after every op
    ops = torch.where(jittered.unsqueeze(1), params[:, ORDER].long(), none)  # [N, 4]
    rows = torch.argsort(ops.T, dim=1, stable=True)  # [4, N]
    sizes = [torch.bincount(ops[:, p], minlength=none + 1)[:none].tolist() for p in range(4)]
    return rows, sizes
