"""What activation checkpointing saves for a ViT-L: peak memory and time of one forward +
backward at a small batch, with timm's set_grad_checkpointing off and on.

    python -m benchmarks.checkpointing [--model vit_large_patch16_224] [--image-size 224]

Two cases: the timm model on its own (model(x), timm's forward_features, which checkpoints each
block when asked), and the project's MAE objective around the same encoder, which runs
`encoder.blocks` itself on the visible tokens: there the switch only helps if MAE honours it.
Gradients are allocated before measuring, so the memory added by a step is activations and
temporaries. CPU: resident set (RSS) high-water mark; CUDA: max allocated.
"""

from __future__ import annotations

import time

import timm
import torch

from benchmarks import workloads
from benchmarks.harness import emit, environment, parser
from benchmarks.measure import PeakMemory, synchronize
from pretrain.objectives import get_objective


def allocate_gradients(model: torch.nn.Module) -> None:
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)


def measure(model: torch.nn.Module, encoder: torch.nn.Module, loss_of, device) -> dict:
    """One forward + backward with checkpointing off, then on: added memory and seconds."""
    measured = {}
    for enabled in (False, True):
        encoder.set_grad_checkpointing(enabled)
        with PeakMemory(device) as memory:
            started = time.perf_counter()
            loss_of(model).backward()
            synchronize(device)
            seconds = time.perf_counter() - started
        measured["on" if enabled else "off"] = {"seconds": seconds, "memory": memory.as_dict()}
    off, on = measured["off"]["memory"]["added_mb"], measured["on"]["memory"]["added_mb"]
    if off is not None and on is not None:
        measured["saved_mb"] = round(off - on, 1)
        measured["saved_fraction"] = round((off - on) / off, 3) if off > 0 else None
    measured["time_ratio_on_off"] = measured["on"]["seconds"] / measured["off"]["seconds"]
    return measured


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--model", default="vit_large_patch16_224")
    arguments.add_argument("--image-size", type=int, default=224)
    arguments.add_argument("--patch-size", type=int, default=16)
    arguments.add_argument("--batch", type=int, default=2)
    arguments.add_argument("--device", default="cpu")
    arguments.add_argument("--tiny", action="store_true", help="test sizes (seconds in all)")
    args = arguments.parse_args(argv)
    if args.tiny:
        args.model, args.image_size, args.patch_size, args.batch = "vit_tiny_patch16_224", 32, 8, 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    sizes = {"img_size": args.image_size, "patch_size": args.patch_size}

    # The timm model alone: forward_features checkpoints block by block when asked.
    encoder = timm.create_model(args.model, num_classes=0, **sizes).to(device).train()
    allocate_gradients(encoder)
    parameters = sum(p.numel() for p in encoder.parameters())
    timm_alone = measure(encoder, encoder, lambda model: model(images).pow(2).mean(), device)
    del encoder

    # The MAE objective around the same encoder (the project's default decoder).
    config = workloads.load("mae", "demo")
    config.model.name, config.model.patch_size, config.model.kwargs = (
        args.model,
        args.patch_size,
        {},
    )
    config.data.image_size = args.image_size
    mae, _ = get_objective("mae").build(config)
    mae.to(device).train()
    allocate_gradients(mae)
    in_mae = measure(mae, mae.encoder, lambda model: model({"image": images})["loss"], device)

    result = {
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "parameters": parameters,
        "timm_forward_features": timm_alone,
        "mae_objective": in_mae,
    }
    rows = [
        {
            "case": case,
            "added MB off": measured["off"]["memory"]["added_mb"],
            "added MB on": measured["on"]["memory"]["added_mb"],
            "saved MB": measured.get("saved_mb"),
            "s off": measured["off"]["seconds"],
            "s on": measured["on"]["seconds"],
        }
        for case, measured in (("timm model(x)", timm_alone), ("MAE objective", in_mae))
    ]
    emit(
        {"benchmark": "checkpointing", "environment": environment(device), "result": result},
        rows,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
