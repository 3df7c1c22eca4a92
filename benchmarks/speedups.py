"""Candidate speed changes, each measured against the current code in alternating rounds in one
process, on the demo configs: a change is worth making only where its gain here is clear.

    python -m benchmarks.speedups [--groups optimizer,attention,grad_norm,host_sync,masking]
    python -m benchmarks.speedups --groups channels_last    # SimCLR ResNet-18 at 32 px
    python -m benchmarks.speedups --groups compile          # torch.compile (compiles first)

Groups (the first variant of each is what the project does today):
  optimizer      AdamW as pretrain.optim builds it (fused) vs foreach vs a plain for-loop
  attention      timm's F.scaled_dot_product_attention vs its explicit softmax(QK^T)V
  grad_norm      clip_grad_norm_(max_norm=inf) (the engine, clip_grad unset) vs get_total_norm,
                 each call alone, and the engine's whole step for scale
  host_sync      the engine's per-step finite check (host waits) vs none
  masking        MAE's random_masking and the decoder's un-shuffle, as a share of the step
  channels_last  a CNN's weights and inputs in NHWC vs NCHW
  compile        torch.compile of the objective vs eager; compile time reported apart
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks import workloads
from benchmarks.harness import emit, environment, fail, parser
from benchmarks.measure import compare_interleaved, summarize, synchronize

GROUPS = ("optimizer", "attention", "grad_norm", "host_sync", "masking", "channels_last", "compile")


def use_fused_attention(module: torch.nn.Module, enabled: bool) -> None:
    """Switch every timm Attention block between SDPA and its explicit matmul path."""
    for block in module.modules():
        if hasattr(block, "fused_attn"):
            block.fused_attn = enabled


def compare(variants: dict, images: int, args, device) -> dict:
    """Interleaved timing; each variant's median step and its gain over the first variant."""
    times = compare_interleaved(
        {name: workload.step for name, workload in variants.items()},
        args.rounds,
        args.steps_per_round,
        args.warmup,
        device,
    )
    summary = {name: summarize(times[name], images) for name in times}
    # gain at the median step, and at the best step (less sensitive to bursts of outside load)
    first = summary[next(iter(summary))]
    for measured in summary.values():
        measured["gain_percent"] = 100 * (first["step_s_median"] / measured["step_s_median"] - 1)
        measured["gain_percent_best"] = 100 * (first["step_s_min"] / measured["step_s_min"] - 1)
        measured["gain_percent_cpu_time"] = 100 * (
            first["cpu_s_median"] / measured["cpu_s_median"] - 1
        )
    return summary


def isolated_seconds(variants: dict, repeats: int) -> dict:
    """Median (wall, CPU) seconds of calls measured alone, interleaved (A B C A B C ...)."""
    times = {name: [] for name in variants}
    for run in variants.values():
        run()
    for _ in range(repeats):
        for name, run in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: tuple(statistics.median(column) for column in zip(*values))
        for name, values in times.items()
    }


def with_random_gradients(workload: workloads.Workload) -> workloads.Workload:
    for parameter in workload.objective.parameters():
        parameter.grad = torch.randn_like(parameter)
    return workload


def grad_norm_calls(workload: workloads.Workload) -> dict:
    """The engine's gradient norm (clip_grad_norm_ to inf) and the norm alone, as calls."""
    parameters = list(workload.objective.parameters())
    return {
        "clip_grad_norm_inf": lambda: torch.nn.utils.clip_grad_norm_(parameters, float("inf")),
        "total_norm": lambda: torch.nn.utils.get_total_norm([p.grad for p in parameters]),
    }


def masking_share(workload: workloads.Workload, repeats: int) -> dict:
    """Forward + backward time of MAE's masking (random_masking) and of the decoder's un-shuffle
    (mask tokens appended, gathered back to image order, prefix and positions added: the same
    ops as MAEDecoder.forward), as a share of the whole step."""
    mae, images = workload.objective, workload.batch["image"]
    with torch.no_grad():
        tokens = mae.encoder.patch_embed(images)  # [N, L, E]
    tokens.requires_grad_(True)
    decoder = mae.decoder

    def masking() -> None:
        visible, _, _ = mae.random_masking(tokens)
        visible.sum().backward()

    keep = int(tokens.shape[1] * (1 - mae.mask_ratio))
    _, _, ids_restore = mae.random_masking(tokens.detach())
    latent = torch.randn(
        tokens.shape[0], mae.num_prefix_tokens + keep, decoder.embed.out_features
    ).requires_grad_(True)

    def unshuffle() -> None:
        prefix, visible = latent[:, : mae.num_prefix_tokens], latent[:, mae.num_prefix_tokens :]
        batch, patches = ids_restore.shape
        masks = decoder.mask_token.expand(batch, patches - visible.shape[1], -1)
        shuffled = torch.cat([visible, masks], dim=1)
        index = ids_restore.unsqueeze(-1).expand(-1, -1, shuffled.shape[-1])
        x = torch.cat([prefix, torch.gather(shuffled, 1, index)], dim=1) + decoder.pos_embed
        x.sum().backward()

    def seconds(run) -> float:
        run()
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        return (time.perf_counter() - started) / repeats

    step = seconds(workload.step)
    masking_s, unshuffle_s = seconds(masking), seconds(unshuffle)
    workload.objective.zero_grad(set_to_none=True)
    return {
        "step_s": step,
        "random_masking_s": masking_s,
        "decoder_unshuffle_s": unshuffle_s,
        "share_of_step_percent": 100 * (masking_s + unshuffle_s) / step,
    }


def main(argv: list[str] | None = None) -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--groups", default="optimizer,attention,grad_norm,host_sync,masking")
    arguments.add_argument("--rounds", type=int, default=4)
    arguments.add_argument("--steps-per-round", type=int, default=3)
    arguments.add_argument("--warmup", type=int, default=2)
    arguments.add_argument("--cnn-batch", type=int, default=32, help="channels_last batch")
    arguments.add_argument("--tiny", action="store_true", help="test sizes (seconds in all)")
    args = arguments.parse_args(argv)
    device = torch.device("cpu")
    groups = args.groups.split(",")
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        fail(f"unknown group(s) {', '.join(unknown)} (known: {', '.join(GROUPS)})")

    mae_config = workloads.load("mae", "demo", tiny=args.tiny)

    def mae(**options) -> workloads.Workload:
        return workloads.build(mae_config, device, **options)  # same seed: same weights, batch

    results, rows = {}, []
    for group in groups:
        if group == "optimizer":
            variants = {name: mae(optimizer=name) for name in ("project", "foreach", "forloop")}
        elif group == "attention":
            variants = {"sdpa": mae(), "explicit": mae()}
            use_fused_attention(variants["explicit"].objective, False)
        elif group == "grad_norm":
            variants = {"engine_step": mae()}
        elif group == "host_sync":
            variants = {"finite_check": mae(), "none": mae(host_sync=False)}
        elif group == "masking":
            results[group] = masking_share(mae(), repeats=3 if args.tiny else 20)
            rows.append(
                {
                    "group": group,
                    "variant": "share of step",
                    "gain %": None,
                    "share %": results[group]["share_of_step_percent"],
                }
            )
            continue
        elif group == "channels_last":
            cnn = workloads.load("simclr", "demo", tiny=args.tiny)
            cnn.model.name, cnn.model.kwargs, cnn.model.patch_size = "resnet18", {}, 0
            variants = {}
            for name in ("nchw", "nhwc"):
                variants[name] = workloads.build(cnn, device, batch_size=args.cnn_batch)
            nhwc = variants["nhwc"]
            nhwc.objective.to(memory_format=torch.channels_last)
            for key in ("image", "image2"):
                nhwc.batch[key] = nhwc.batch[key].contiguous(memory_format=torch.channels_last)
        elif group == "compile":
            eager = mae()
            compiled = workloads.Workload(
                mae_config, torch.compile(eager.objective), eager.batch, device
            )
            started = time.perf_counter()
            compiled.step()
            synchronize(device)
            results["compile_seconds"] = time.perf_counter() - started
            variants = {"eager": eager, "compiled": compiled}
        images = next(iter(variants.values())).images
        results[group] = compare(variants, images, args, device)
        repeats = 3 if args.tiny else 30
        if group == "optimizer":  # the optimizer step alone, on the same random gradients
            alone = isolated_seconds(
                {n: with_random_gradients(w).optimizers[0].step for n, w in variants.items()},
                repeats,
            )
        elif group == "grad_norm":
            alone = isolated_seconds(grad_norm_calls(with_random_gradients(mae())), repeats)
        else:
            alone = {}
        for name, (wall, cpu) in alone.items():
            results[group].setdefault(name, {})["alone_s_median"] = wall
            results[group][name]["alone_cpu_s_median"] = cpu
        for name, measured in results[group].items():
            rows.append(
                {
                    "group": group,
                    "variant": name,
                    "img/s": measured.get("items_per_s"),
                    "gain %": measured.get("gain_percent"),
                    "gain % (best)": measured.get("gain_percent_best"),
                    "gain % (CPU time)": measured.get("gain_percent_cpu_time"),
                    "alone CPU ms": 1000 * measured["alone_cpu_s_median"]
                    if "alone_cpu_s_median" in measured
                    else None,
                }
            )
    emit(
        {
            "benchmark": "speedups",
            "environment": environment(device),
            "config": "configs/pretrain/demo_mae.yaml",
            "results": results,
        },
        rows,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
