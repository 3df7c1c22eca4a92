"""SimCLR's batched colour augmentation (pretrain/models/color_augment.py, with the per-view
draws of pretrain/data/view_params.py) against torchvision's tensor ops applied one image at a
time with the same factors."""

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pretrain.data import view_params as vp
from pretrain.data.transforms import normalize_pixels
from pretrain.models import color_augment as ca

REFERENCE_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _images(count=24, size=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, size, size, generator=generator)
    images[0] = 0.5  # gray: zero chroma
    images[1, :, :, :4] = images[1, 0, :, :4]  # ties between channels
    return images


@pytest.mark.parametrize("op_index", range(4))
def test_each_colour_op_matches_torchvision_per_image(op_index):
    images = _images()
    generator = torch.Generator().manual_seed(1)
    if op_index == 3:  # hue: a fraction of a turn in [-0.5, 0.5]
        factors = torch.rand(len(images), generator=generator) - 0.5
    else:
        factors = 1.8 * torch.rand(len(images), generator=generator)
    batched = ca.COLOR_OPS[op_index](images.clone(), factors)
    reference = torch.stack(
        [REFERENCE_OPS[op_index](image, float(f)) for image, f in zip(images, factors)]
    )
    assert torch.allclose(batched, reference, atol=1e-5)


def test_blur_matches_torchvision_and_sigma_zero_leaves_the_image():
    images = _images()
    sigma = torch.linspace(0.1, 2.0, len(images))
    sigma[::4] = 0
    blurred = ca.gaussian_blur(images, sigma, 5)
    for image, out, s in zip(images, blurred, sigma.tolist()):
        expected = image if s == 0 else TF.gaussian_blur(image, [5, 5], [s, s])
        assert torch.allclose(out, expected, atol=1e-5)


def test_augment_views_follows_each_images_own_order_then_gray_blur_normalize():
    torch.manual_seed(3)
    pixels = torch.randint(0, 256, (64, 3, 10, 10), dtype=torch.uint8)
    params = torch.stack(
        [vp.draw_view_params((0.8, 0.8, 0.8, 0.2), 0.8, 0.2, 0.5) for _ in range(64)]
    )
    orders = {tuple(row) for row in params[params[:, vp.JITTER_APPLIED] > 0, vp.ORDER].tolist()}
    assert len(orders) > 5  # the test covers many different orders
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.3, 0.25])
    normalized = normalize_pixels(pixels, mean, std)  # as the loader's batches hold them
    groups = vp.jitter_groups(params)
    out = ca.augment_views(normalized, params, mean, std, blur_kernel=3, groups=groups)
    for image, row, augmented in zip(pixels, params, out):
        expected = image.float() / 255
        if row[vp.JITTER_APPLIED] > 0:
            for op_index in row[vp.ORDER].long().tolist():
                expected = REFERENCE_OPS[op_index](expected, float(row[vp.BRIGHTNESS + op_index]))
        if row[vp.GRAYSCALE] > 0:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        if row[vp.BLUR_SIGMA] > 0:
            sigma = float(row[vp.BLUR_SIGMA])
            expected = TF.gaussian_blur(expected, [3, 3], [sigma, sigma])
        expected = TF.normalize(expected, mean.tolist(), std.tolist())
        assert torch.allclose(augmented, expected, atol=1e-4)


def test_drawn_params_follow_the_configured_probabilities_and_ranges():
    torch.manual_seed(0)
    params = torch.stack(
        [vp.draw_view_params((0.4, 0.3, 0.2, 0.1), 0.8, 0.2, 0.5) for _ in range(4000)]
    )
    jittered = params[:, vp.JITTER_APPLIED] > 0
    assert abs(jittered.float().mean() - 0.8) < 0.03
    assert abs(params[:, vp.GRAYSCALE].mean() - 0.2) < 0.03
    assert abs((params[:, vp.BLUR_SIGMA] > 0).float().mean() - 0.5) < 0.03
    on = params[jittered]
    for index, strength in zip((vp.BRIGHTNESS, vp.CONTRAST, vp.SATURATION), (0.4, 0.3, 0.2)):
        assert on[:, index].min() >= 1 - strength and on[:, index].max() <= 1 + strength
    assert on[:, vp.HUE].abs().max() <= 0.1
    assert torch.equal(params[~jittered, vp.BRIGHTNESS : vp.HUE + 1][0], torch.tensor(vp.IDENTITY))
    sigmas = params[params[:, vp.BLUR_SIGMA] > 0, vp.BLUR_SIGMA]
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0


def test_random_crop_box_stays_inside_the_image_with_the_asked_area_and_ratio():
    torch.manual_seed(0)
    for _ in range(500):
        left, top, width, height = vp.random_crop_box(40, 30, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and left + width <= 40 and 0 <= top and top + height <= 30
        assert 0.2 * 1200 * 0.8 <= width * height <= 1200
    # no crop can satisfy a ratio of 4 inside a square: the centred fallback
    assert vp.random_crop_box(30, 30, (0.9, 1.0), (4.0, 5.0)) == (0, 11, 30, 8)
    assert ca.blur_kernel_size(224, 0.1) == 23 and ca.blur_kernel_size(32, 0.1) == 3
    assert vp.blur_probability(32, None) == 0 and vp.blur_probability(96, None) == 0.5
    assert math.isclose(vp.blur_probability(32, 0.3), 0.3)
