"""The contrastive losses against naive references written from their papers, in float64.

The references loop over anchors and pairs with scalar arithmetic, in each paper's own
indexing, so they share no vectorised code (or row ordering) with pretrain.losses.
"""

import math

import pytest
import torch

from pretrain.losses import clip_loss, nt_xent, retrieval_stats, siglip_loss

SHAPES = [(1, 3), (2, 5), (5, 3), (8, 16)]  # (batch, width)


def cosine(u, v):
    return (u * v).sum() / (u.norm() * v.norm())


def simclr_reference(z1, z2, temperature):
    """SimCLR (Chen et al., 2020) eq. 1, L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)].

    The paper interleaves the views: example 2k-1 and 2k are the two views of image k.
    """
    views = [view for pair in zip(z1, z2) for view in pair]  # 2N vectors

    def pair_loss(i, j):  # the paper's l(i, j)
        numerator = torch.exp(cosine(views[i], views[j]) / temperature)
        denominator = sum(
            torch.exp(cosine(views[i], views[k]) / temperature) for k in range(len(views)) if k != i
        )
        return -torch.log(numerator / denominator)

    images = len(z1)
    return sum(pair_loss(2 * k, 2 * k + 1) + pair_loss(2 * k + 1, 2 * k) for k in range(images)) / (
        2 * images
    )


def clip_reference(images, texts, scale):
    """CLIP (Radford et al., 2021) Figure 3: cross-entropy over both axes of the logit matrix."""
    n = len(images)
    logits = [[cosine(images[i], texts[j]) * scale for j in range(n)] for i in range(n)]
    loss_images = sum(
        -torch.log(torch.exp(logits[i][i]) / sum(torch.exp(logits[i][j]) for j in range(n)))
        for i in range(n)
    )
    loss_texts = sum(
        -torch.log(torch.exp(logits[j][j]) / sum(torch.exp(logits[i][j]) for i in range(n)))
        for j in range(n)
    )
    return (loss_images / n + loss_texts / n) / 2


def siglip_reference(images, texts, scale, bias):
    """SigLIP (Zhai et al., 2023) Algorithm 1: -sum log_sigmoid(labels * logits) / n."""
    n = len(images)
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            logit = cosine(images[i], texts[j]) * scale + bias
            total = total - torch.log(torch.sigmoid(label * logit))
    return total / n


def leaves(*shape, count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()
        for _ in range(count)
    ]


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("batch, width", SHAPES)
@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_nt_xent_matches_the_paper(batch, width, temperature):
    z1, z2 = leaves(batch, width, seed=batch * width)
    ours = nt_xent(z1, z2, temperature)
    reference = simclr_reference(z1, z2, temperature)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    for mine, theirs in zip(grads(ours, [z1, z2]), grads(reference, [z1, z2])):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch, width", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_matches_the_paper(batch, width, scale):
    images, texts = leaves(batch, width, seed=batch + width)
    logit_scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    ours = clip_loss(images, texts, logit_scale)
    reference = clip_reference(images, texts, logit_scale)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-11)
    inputs = [images, texts, logit_scale]
    for mine, theirs in zip(grads(ours, inputs), grads(reference, inputs)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-11)


@pytest.mark.parametrize("batch, width", SHAPES)
@pytest.mark.parametrize("scale, bias", [(10.0, -10.0), (1.0, 0.0), (30.0, 2.5)])
def test_siglip_loss_matches_the_paper(batch, width, scale, bias):
    images, texts = leaves(batch, width, seed=3 * batch + width)
    logit_scale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    logit_bias = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    ours = siglip_loss(images, texts, logit_scale, logit_bias)
    reference = siglip_reference(images, texts, logit_scale, logit_bias)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-11)
    inputs = [images, texts, logit_scale, logit_bias]
    for mine, theirs in zip(grads(ours, inputs), grads(reference, inputs)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-11)


def split_losses(name, world, batch, width):
    """One process's view of the global loss, W times over: returns (mean of parts, full, inputs).

    Each simulated process r holds rows r*B..(r+1)*B and sees the whole batch as *_all.
    """
    first, second = leaves(world * batch, width, seed=world * 100 + batch)
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    losses = {
        "nt_xent": lambda a, b, a_all=None, b_all=None, offset=0: nt_xent(
            a, b, 0.2, a_all, b_all, offset
        ),
        "clip": lambda a, b, a_all=None, b_all=None, offset=0: clip_loss(
            a, b, scale, a_all, b_all, offset
        ),
        "siglip": lambda a, b, a_all=None, b_all=None, offset=0: siglip_loss(
            a, b, scale, bias, a_all, b_all, offset
        ),
    }
    loss = losses[name]
    parts = [
        loss(
            first[rank * batch : (rank + 1) * batch],
            second[rank * batch : (rank + 1) * batch],
            first,
            second,
            offset=rank * batch,
        )
        for rank in range(world)
    ]
    inputs = [first, second] + ([scale] if name != "nt_xent" else [])
    inputs += [bias] if name == "siglip" else []
    return torch.stack(parts).mean(), loss(first, second), inputs


@pytest.mark.parametrize("name", ["nt_xent", "clip", "siglip"])
@pytest.mark.parametrize("world, batch", [(2, 3), (4, 2), (3, 1)])
def test_mean_over_processes_is_the_global_loss(name, world, batch):
    mean_of_parts, full, inputs = split_losses(name, world, batch, width=6)
    torch.testing.assert_close(mean_of_parts, full, rtol=0, atol=1e-12)
    for part_grad, full_grad in zip(grads(mean_of_parts, inputs), grads(full, inputs)):
        torch.testing.assert_close(part_grad, full_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["nt_xent", "clip", "siglip"])
def test_local_negatives_are_not_the_global_loss(name):
    """Guards the test above: a piece scored against its own rows only is a different loss."""
    world, batch = 2, 4
    first, second = leaves(world * batch, 6, seed=7)
    scale, bias = torch.tensor(14.0), torch.tensor(-3.0)
    call = {
        "nt_xent": lambda a, b, *rest: nt_xent(a, b, 0.2, *rest),
        "clip": lambda a, b, *rest: clip_loss(a, b, scale, *rest),
        "siglip": lambda a, b, *rest: siglip_loss(a, b, scale, bias, *rest),
    }[name]
    local = torch.stack(
        [
            call(first[r * batch : (r + 1) * batch], second[r * batch : (r + 1) * batch])
            for r in (0, 1)
        ]
    ).mean()
    assert abs(local.item() - call(first, second).item()) > 1e-2


def one_hot_rows(batch, width):
    return torch.eye(width, dtype=torch.float64)[:batch] * 3.0  # norm 3, normalised inside


def test_perfect_alignment_gives_low_loss_and_full_top1():
    aligned = one_hot_rows(6, 8)
    shuffled = aligned[torch.tensor([1, 0, 3, 2, 5, 4])]
    assert nt_xent(aligned, aligned, 0.05) < 1e-6
    assert nt_xent(aligned, shuffled, 0.05) > 10.0
    scale = torch.tensor(100.0, dtype=torch.float64)
    assert clip_loss(aligned, aligned, scale) < 1e-6
    assert clip_loss(aligned, shuffled, scale) > 10.0
    bias = torch.tensor(-50.0, dtype=torch.float64)
    assert siglip_loss(aligned, aligned, scale, bias) < 1e-6
    assert siglip_loss(aligned, shuffled, scale, bias) > 10.0
    stats = retrieval_stats(aligned, aligned)
    assert stats["top1"].item() == 1.0
    assert stats["pos_sim"].item() == pytest.approx(1.0)
    assert stats["neg_sim"].item() == pytest.approx(0.0)
    assert retrieval_stats(aligned, shuffled)["top1"].item() == 0.0


def test_retrieval_stats_on_a_worked_example():
    # Two local queries; three global candidates, this process's positives at rows 1 and 2.
    queries = torch.tensor([[4.0, 0.0], [0.0, 0.5]])
    candidates = torch.tensor([[0.0, 3.0], [2.0, 0.0], [5.0, 5.0]])
    half = 1 / math.sqrt(2)
    # Cosines: query 0 -> [0, 1, half] (own positive wins); query 1 -> [1, 0, half] (row 0 wins).
    stats = retrieval_stats(queries, candidates[1:], candidates, offset=1)
    assert set(stats) == {"pos_sim", "neg_sim", "top1"}
    assert all(value.ndim == 0 and not value.requires_grad for value in stats.values())
    assert stats["pos_sim"].item() == pytest.approx((1 + half) / 2)
    assert stats["neg_sim"].item() == pytest.approx((0 + half + 1 + 0) / 4)
    assert stats["top1"].item() == 0.5
    # Local only: the row-0 distractor is gone, so both queries find their positive.
    local = retrieval_stats(queries, candidates[1:])
    assert local["top1"].item() == 1.0
    assert local["neg_sim"].item() == pytest.approx((half + 0) / 2)


def test_retrieval_stats_does_not_track_gradients():
    a, b = leaves(4, 3)
    assert not retrieval_stats(a, b)["pos_sim"].requires_grad


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda z: nt_xent(z, z, 0.1, z1_all=torch.zeros(8, 3)), "both z1_all and z2_all"),
        (lambda z: nt_xent(z, z, 0.1, torch.zeros(8, 3), torch.zeros(8, 3), 6), "exceeds"),
        (lambda z: clip_loss(z, z, 1.0, offset=2), "needs the global"),
        (lambda z: clip_loss(z, z, 1.0, torch.zeros(8, 4), torch.zeros(8, 4)), "width"),
        (lambda z: siglip_loss(z, z[:2], 1.0, 0.0), "differ in shape"),
    ],
)
def test_mismatched_inputs_raise_one_line(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call(torch.zeros(4, 3))
    assert "\n" not in str(error.value)
