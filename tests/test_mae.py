import timm
import torch
from safetensors.torch import load_file

from pretrain.config import load_config
from pretrain.models.position import sincos_2d
from pretrain.objectives import build_objective

TINY = ["model.kwargs={depth: 2, embed_dim: 64, num_heads: 2}", "mae.decoder_dim=32"]


def tiny_mae(*overrides):
    torch.manual_seed(0)
    model, spec = build_objective(load_config(None, [*TINY, *overrides]))
    return model, spec


def test_mask_ratio_is_exact_and_masks_differ_per_sample():
    model, _ = tiny_mae()
    tokens = torch.randn(16, 64, 8)  # 32px / patch 4 -> L = 64
    visible, mask, ids_restore = model.random_masking(tokens)
    assert visible.shape == (16, 16, 8)
    assert torch.all(mask.sum(dim=1) == 48)  # 75% of 64, for every sample
    assert len({tuple(row.tolist()) for row in mask}) == 16
    # Visible tokens are the unmasked ones, in some order.
    for sample in range(16):
        kept = tokens[sample][mask[sample] == 0]
        assert torch.equal(kept.sort(dim=0).values, visible[sample].sort(dim=0).values)
    # ids_restore inverts the shuffle: restore the keep-first order and the mask lines up.
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(64).expand(16, -1))


def test_encoder_sees_only_visible_tokens():
    model, _ = tiny_mae("mae.mask_ratio=0.5")
    seen = []
    model.encoder.blocks[0].register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape)
    )
    model({"image": torch.randn(3, 3, 32, 32)})
    assert seen == [torch.Size([3, 1 + 32, 64])]  # cls + L * (1 - r)


def test_loss_ignores_predictions_of_visible_patches():
    model, _ = tiny_mae("mae.norm_pix_loss=true")
    images = torch.randn(4, 3, 32, 32)
    prediction = torch.randn(4, 64, 4 * 4 * 3)
    _, mask, _ = model.random_masking(torch.zeros(4, 64, 1))
    loss = model.reconstruction_loss(images, prediction, mask)
    changed_visible = prediction + 10.0 * (1 - mask).unsqueeze(-1)
    assert torch.equal(loss, model.reconstruction_loss(images, changed_visible, mask))
    changed_masked = prediction + 10.0 * mask.unsqueeze(-1)
    assert not torch.allclose(loss, model.reconstruction_loss(images, changed_masked, mask))


def test_norm_pix_target_and_perfect_prediction_gives_zero_loss():
    model, _ = tiny_mae("mae.norm_pix_loss=false")
    images = torch.randn(2, 3, 32, 32)
    patches = model.patchify(images)
    assert torch.equal(model.unpatchify(patches), images)
    _, mask, _ = model.random_masking(torch.zeros(2, 64, 1))
    assert model.reconstruction_loss(images, patches, mask).item() == 0.0


def test_gradients_reach_encoder_and_decoder_but_not_fixed_positions():
    model, _ = tiny_mae()
    model({"image": torch.randn(2, 3, 32, 32)})["loss"].backward()
    assert model.encoder.pos_embed.grad is None and not model.encoder.pos_embed.requires_grad
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.encoder.cls_token.grad.abs().sum() > 0
    assert model.decoder.mask_token.grad.abs().sum() > 0


def test_sincos_positions_are_fixed_and_distinct():
    table = sincos_2d(64, 8, 8)
    assert table.shape == (64, 64)
    assert torch.unique(table, dim=0).shape[0] == 64
    model, _ = tiny_mae()
    assert torch.allclose(model.encoder.pos_embed[0, 1:], sincos_2d(64, 8, 8))
    assert torch.all(model.encoder.pos_embed[0, 0] == 0)


def test_visualize_returns_rows_of_three():
    model, _ = tiny_mae()
    grids = model.visualize({"image": torch.randn(5, 3, 32, 32)}, count=4)
    assert grids["reconstruction"].shape == (4, 3, 3, 32, 32)


def test_encoder_state_loads_strictly_into_timm(tmp_path):
    from pretrain.checkpoint import export_encoder

    model, spec = tiny_mae()
    weights, card = export_encoder(tmp_path, model.encoder.state_dict(), spec.name, spec.kwargs, {})
    rebuilt = timm.create_model(spec.name, **spec.kwargs)
    rebuilt.load_state_dict(load_file(weights), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(rebuilt(x), model.encoder.eval()(x))
    assert rebuilt(x).shape == (2, 64)  # num_classes=0: pooled features


def test_gradient_checkpointing_recomputes_blocks_and_keeps_the_gradients():
    model, _ = tiny_mae()
    images = torch.randn(4, 3, 32, 32)

    def gradients_and_block_calls():
        calls = []
        block = model.encoder.blocks[0]
        forward = block.forward

        def counted(*args, **kwargs):  # (a forward hook would not see the recomputation)
            calls.append(1)
            return forward(*args, **kwargs)

        block.forward = counted
        torch.manual_seed(1)  # the same masks in both passes
        model.zero_grad()
        model({"image": images})["loss"].backward()
        del block.forward
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls

    plain, plain_calls = gradients_and_block_calls()
    model.encoder.set_grad_checkpointing(True)
    checkpointed, checkpointed_calls = gradients_and_block_calls()
    assert len(plain_calls) == 1 and len(checkpointed_calls) == 2  # forward, then recomputed
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6), name
