"""MAE's encoder on visible patches only versus the same encoder carrying mask tokens.

    python -m benchmarks.mae_visible [--configs demo,paper] [--rounds 3]

Both variants share one model, one batch and one mask per step. "visible" is the project's MAE
step (pretrain/objectives/mae.py). "mask_tokens" replaces each masked patch embedding by a
learned token (plus its position) and runs all L tokens through every encoder block, then the
decoder on all tokens without un-shuffling, as the MAE paper's "encoder w/ [M]" ablation (its
Table 2c and 3; about 3x slower for ViT-L). The loss is the same masked-patch MSE.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from benchmarks import workloads
from benchmarks.harness import emit, environment, parser
from benchmarks.measure import compare_interleaved, count_flops, summarize
from pretrain.objectives import get_objective
from pretrain.objectives.mae import MAE


class MaskTokensThroughEncoder(nn.Module):
    """The MAE objective with mask tokens in the encoder; shares every weight with `mae`."""

    def __init__(self, mae: MAE):
        super().__init__()
        self.mae = mae
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, mae.encoder.embed_dim))
        nn.init.normal_(self.encoder_mask_token, std=0.02)

    def forward(self, batch: dict) -> dict:
        mae, encoder, decoder = self.mae, self.mae.encoder, self.mae.decoder
        images = batch["image"]
        prefix_count = mae.num_prefix_tokens
        positions = (
            encoder.pos_embed[:, prefix_count:] if mae.prefix_has_position else (encoder.pos_embed)
        )  # [1, L, E]
        tokens = encoder.patch_embed(images) + positions  # [N, L, E]
        _, mask, _ = mae.random_masking(tokens)  # mask [N, L]: 1 = masked
        masked = mask.unsqueeze(-1).bool()  # [N, L, 1]
        tokens = torch.where(masked, self.encoder_mask_token + positions, tokens)
        prefix = mae._prefix_tokens(images.shape[0])
        if prefix is not None:
            tokens = torch.cat([prefix, tokens], dim=1)  # [N, P + L, E]
        latent = encoder.norm(encoder.blocks(encoder.norm_pre(tokens)))
        x = decoder.embed(latent) + decoder.pos_embed  # [N, P + L, D], image order already
        x = decoder.norm(decoder.blocks(x))
        prediction = decoder.predict(x[:, prefix_count:])  # [N, L, p*p*3]
        return {"loss": mae.reconstruction_loss(images, prediction, mask)}


def flops_on_meta(config, batch_size: int) -> dict:
    """FLOPs per step of both variants, counted on the meta device (no compute, any size)."""
    sample = workloads.synthetic_batch(config, 1, "cpu")
    batch = {"image": torch.empty((batch_size, *sample["image"].shape[1:]), device="meta")}
    with torch.device("meta"):
        mae, _ = get_objective("mae").build(config)
        full = MaskTokensThroughEncoder(mae)
    meta = torch.device("meta")
    return {
        "visible": count_flops(workloads.Workload(config, mae, batch, meta).forward_backward),
        "mask_tokens": count_flops(workloads.Workload(config, full, batch, meta).forward_backward),
    }


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--configs", default="demo,paper")
    arguments.add_argument("--rounds", type=int, default=3)
    arguments.add_argument("--steps-per-round", type=int, default=2)
    arguments.add_argument("--warmup", type=int, default=1)
    arguments.add_argument("--paper-batch", type=int, default=2, help="timed batch, paper config")
    arguments.add_argument(
        "--flops-only-model",
        default="vit_large_patch16_224",
        help="also count (not time) both variants with this encoder in the paper config",
    )
    arguments.add_argument("--tiny", action="store_true", help="test sizes (seconds in all)")
    args = arguments.parse_args(argv)
    device = torch.device("cpu")

    results, rows = [], []
    for kind in args.configs.split(","):
        config = workloads.load("mae", kind, tiny=args.tiny)
        batch_size = config.data.batch_size if kind == "demo" else args.paper_batch
        visible = workloads.build(config, device, batch_size=batch_size)
        full = workloads.Workload(
            config, MaskTokensThroughEncoder(visible.objective), visible.batch, device
        )
        flops = {
            "visible": count_flops(visible.forward_backward),
            "mask_tokens": count_flops(full.forward_backward),
        }
        times = compare_interleaved(
            {"visible": visible.step, "mask_tokens": full.step},
            args.rounds,
            args.steps_per_round,
            args.warmup,
            device,
        )
        summary = {name: summarize(times[name], batch_size) for name in times}
        speedup = summary["mask_tokens"]["step_s_median"] / summary["visible"]["step_s_median"]
        speedup_cpu = summary["mask_tokens"]["cpu_s_median"] / summary["visible"]["cpu_s_median"]
        result = {
            "config": kind,
            "model": config.model.name,
            "image_size": config.data.image_size,
            "patches": visible.objective.grid_size[0] * visible.objective.grid_size[1],
            "mask_ratio": config.mae.mask_ratio,
            "decoder": [config.mae.decoder_dim, config.mae.decoder_depth],
            "batch_size": batch_size,
            "flops_per_step": flops,
            "flops_ratio": flops["mask_tokens"] / flops["visible"],
            "timing": summary,
            "speedup_of_visible_only": speedup,
            "speedup_of_visible_only_cpu_time": speedup_cpu,
        }
        results.append(result)
        rows.append(
            {
                "config": kind,
                "batch": batch_size,
                "visible img/s": summary["visible"]["items_per_s"],
                "mask-token img/s": summary["mask_tokens"]["items_per_s"],
                "speedup": speedup,
                "speedup (CPU time)": speedup_cpu,
                "FLOP ratio": result["flops_ratio"],
            }
        )
    if args.flops_only_model and not args.tiny:
        config = workloads.load("mae", "paper", [f"model.name={args.flops_only_model}"])
        flops = flops_on_meta(config, config.data.batch_size)
        ratio = flops["mask_tokens"] / flops["visible"]
        results.append(
            {
                "config": "paper, FLOPs only",
                "model": config.model.name,
                "batch_size": config.data.batch_size,
                "decoder": [config.mae.decoder_dim, config.mae.decoder_depth],
                "flops_per_step": flops,
                "flops_ratio": ratio,
            }
        )
        rows.append({"config": f"paper {config.model.name}", "FLOP ratio": ratio})
    emit(
        {"benchmark": "mae_visible", "environment": environment(device), "results": results},
        rows,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
