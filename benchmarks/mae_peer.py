"""Our MAE training step next to Hugging Face transformers' ViTMAEForPreTraining, same config,
same batch, same optimizer, measured in alternating rounds in one process.

    python -m benchmarks.mae_peer [--configs demo,paper] [--peer-path .bench_deps]

transformers is not a dependency of this package. Install it for the benchmark only, e.g.
`pip install --target .bench_deps --no-deps transformers tokenizers` (the rest of what it needs
is already installed with this package); --peer-path is appended to sys.path, so packages in the
environment win over copies there. Without it the JSON says "peer unavailable" and times ours.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from benchmarks import workloads
from benchmarks.harness import ROOT, emit, environment, parser
from benchmarks.measure import compare_interleaved, count_flops, summarize
from pretrain.config import Config


class HuggingFaceMAE(torch.nn.Module):
    """ViTMAEForPreTraining behind the objective interface: forward(batch) -> {"loss"}."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict:
        return {"loss": self.model(pixel_values=batch["image"]).loss}


def load_peer(peer_path: Path):
    """transformers' ViTMAEConfig and ViTMAEForPreTraining, or the reason they are missing."""
    if peer_path.is_dir() and str(peer_path) not in sys.path:
        sys.path.append(str(peer_path))
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
        from transformers import __version__ as version
    except ImportError as error:
        return None, f"peer unavailable: transformers is not installed ({error})"
    return (ViTMAEConfig, ViTMAEForPreTraining, version), None


def peer_config(config: Config, hf_config_class):
    """The ViTMAEConfig of our config: same widths, depths, heads, MLP ratio 4, mask ratio, loss
    target, and timm's LayerNorm eps (1e-6), so both models hold the same parameters."""
    kwargs = config.model.kwargs
    timm_defaults = {  # the timm ViTs our configs name, before their kwargs
        "vit_tiny_patch16_224": (192, 12, 3),
        "vit_small_patch16_224": (384, 12, 6),
        "vit_base_patch16_224": (768, 12, 12),
        "vit_large_patch16_224": (1024, 24, 16),
    }
    if config.model.name not in timm_defaults:
        raise ValueError(f"no HF ViTMAE equivalent written for {config.model.name}")
    width, depth, heads = timm_defaults[config.model.name]
    width = kwargs.get("embed_dim", width)
    settings = config.mae
    return hf_config_class(
        image_size=config.data.image_size,
        patch_size=config.model.patch_size,
        hidden_size=width,
        num_hidden_layers=kwargs.get("depth", depth),
        num_attention_heads=kwargs.get("num_heads", heads),
        intermediate_size=4 * width,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        decoder_hidden_size=settings.decoder_dim,
        decoder_num_hidden_layers=settings.decoder_depth,
        decoder_num_attention_heads=settings.decoder_heads,
        decoder_intermediate_size=4 * settings.decoder_dim,
        mask_ratio=settings.mask_ratio,
        norm_pix_loss=settings.norm_pix_loss,
    )


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--configs", default="demo")
    arguments.add_argument("--rounds", type=int, default=4)
    arguments.add_argument("--steps-per-round", type=int, default=3)
    arguments.add_argument("--warmup", type=int, default=2)
    arguments.add_argument("--paper-batch", type=int, default=2, help="timed batch, paper config")
    arguments.add_argument("--peer-path", type=Path, default=ROOT / ".bench_deps")
    arguments.add_argument("--tiny", action="store_true", help="test sizes (seconds in all)")
    args = arguments.parse_args(argv)
    device = torch.device("cpu")
    peer, unavailable = load_peer(args.peer_path)

    results, rows = [], []
    for kind in args.configs.split(","):
        config = workloads.load("mae", kind, tiny=args.tiny)
        batch_size = config.data.batch_size if kind == "demo" else args.paper_batch
        ours = workloads.build(config, device, batch_size=batch_size)
        variants = {"ours": ours}
        result = {"config": kind, "model": config.model.name, "batch_size": batch_size}
        if peer is not None:
            hf_config_class, hf_model_class, version = peer
            torch.manual_seed(0)
            model = hf_model_class(peer_config(config, hf_config_class))
            variants["hf_vitmae"] = workloads.Workload(
                config, HuggingFaceMAE(model), ours.batch, device
            )
            result["peer"] = {
                "name": "transformers.ViTMAEForPreTraining",
                "version": version,
                "attention": model.config._attn_implementation,
            }
        else:
            result["peer"] = unavailable
        result["parameters"] = {name: variant.parameters for name, variant in variants.items()}
        result["flops_per_step"] = {
            name: count_flops(variant.forward_backward) for name, variant in variants.items()
        }
        times = compare_interleaved(
            {name: variant.step for name, variant in variants.items()},
            args.rounds,
            args.steps_per_round,
            args.warmup,
            device,
        )
        result["timing"] = {name: summarize(times[name], batch_size) for name in times}
        row = {
            "config": kind,
            "batch": batch_size,
            "ours img/s": result["timing"]["ours"]["items_per_s"],
        }
        if "hf_vitmae" in times:
            ratio = (
                result["timing"]["hf_vitmae"]["step_s_median"]
                / result["timing"]["ours"]["step_s_median"]
            )
            result["speedup_over_peer"] = ratio
            result["speedup_over_peer_cpu_time"] = (
                result["timing"]["hf_vitmae"]["cpu_s_median"]
                / result["timing"]["ours"]["cpu_s_median"]
            )
            row.update(
                {
                    "HF img/s": result["timing"]["hf_vitmae"]["items_per_s"],
                    "ours / HF": ratio,
                    "ours / HF (CPU time)": result["speedup_over_peer_cpu_time"],
                }
            )
        else:
            row["HF img/s"] = unavailable
        results.append(result)
        rows.append(row)
    emit(
        {"benchmark": "mae_peer", "environment": environment(device), "results": results},
        rows,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
