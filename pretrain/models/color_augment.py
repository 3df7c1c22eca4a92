"""SimCLR's colour augmentation, batched on the training device: colour jitter (each image its
own factors and op order), grayscale and Gaussian blur, applied by the objective to the crops the
loader made, with the random choices the loader drew (pretrain/data/view_params.py). In PIL,
per image, these ops starved the training step on a small CPU (benchmarks/README.md).

The maths follows torchvision's tensor ops (ColorJitter, RandomGrayscale, GaussianBlur), with
the factors given per image instead of per call; tests/test_view_augment.py checks each op
against torchvision image by image.

Shapes: N images (views) in the batch, [N, 3, H, W]; params [N, VIEW_PARAMS].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.data.view_params import BLUR_SIGMA, BRIGHTNESS, GRAYSCALE

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision


def blur_kernel_size(image_size: int, fraction: float) -> int:
    """Odd kernel side, about `fraction` of the image side, at least 3 (23 at 224 px)."""
    return max(3, int(image_size * fraction) // 2 * 2 + 1)


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
