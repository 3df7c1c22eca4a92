"""Every benchmark runs end to end at test size and prints one valid JSON document.

The scripts run in this process (their main(argv)), so torch and timm are imported once; the
figures themselves are meaningless at these sizes, only their presence and sanity are checked.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from benchmarks import (
    checkpointing,
    finetune_sweep,
    fsdp_memory,
    gpu_h200,
    loader,
    mae_peer,
    mae_visible,
    monitor,
    probe,
    quality_cifar10,
    speedups,
    step,
    workloads,
)
from benchmarks.measure import count_flops
from pretrain.__main__ import main as pretrain_main
from pretrain.data import ensure_demo_data


def run(capsys, main, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def shards(demo_dir) -> dict:
    """The session's demo shards (labels and captions): {"train": index, "val": index}."""
    return ensure_demo_data(demo_dir, 256, 64, 32, seed=0)


def test_step_times_each_objective_and_counts_paper_flops(capsys):
    result = run(
        capsys, step.main, "--objectives", "mae,simclr,clip", "--configs", "demo,cifar,paper",
        "--tiny", "--steps", "1", "--warmup", "1",
    )  # fmt: skip
    assert result["benchmark"] == "step"
    assert result["matmul_peak"]["used_flops_per_s"] > 0
    timed = [entry for entry in result["results"] if entry["config"] == "demo"]
    assert [entry["objective"] for entry in timed] == ["mae", "simclr", "clip"]
    for entry in timed:
        assert entry["timing"]["images_per_s"] > 0
        assert 0 < entry["timing"]["mfu"]
        assert entry["memory"]["peak_mb"] is None or entry["memory"]["peak_mb"] > 0
    paper = {entry["objective"]: entry for entry in result["results"] if entry["config"] == "paper"}
    cifar = {entry["objective"]: entry for entry in result["results"] if entry["config"] == "cifar"}
    for entry in [*paper.values(), *cifar.values()]:  # --tiny: counted, not timed
        assert entry["timing"] is None and entry["timing_skipped"]
    # CIFAR MAE, ViT-S: 24 d^2 FLOPs per token and block forward; 17 tokens x 12 blocks at
    # d=384 (0.72 G) + decoder 65 x 4 at d=256 (0.41 G), three times that with the backward
    assert 2.8e9 < cifar["mae"]["flops_per_image"] < 4.5e9
    # MAE ViT-B/16 at 224 px, decoder 512 x 8: about 18 GFLOP forward per image (4.3 encoder on
    # 49 visible patches + 5 decoder on 196 + attention), three times that with the backward.
    assert 45e9 < paper["mae"]["flops_per_image"] < 70e9


def test_meta_flop_count_matches_a_real_cpu_step():
    """The meta-device count (used for MFU) agrees with counting a real CPU step, where the
    attention runs in the CPU flash kernel that torch's FlopCounterMode does not know."""
    config = workloads.load("mae", "demo", tiny=True)
    real = count_flops(workloads.build(config).forward_backward)
    meta = workloads.step_flops(config)
    assert real == pytest.approx(meta, rel=0.02)


def test_mae_visible_only_costs_fewer_flops_than_mask_tokens(capsys):
    result = run(
        capsys, mae_visible.main, "--configs", "demo", "--tiny",
        "--rounds", "1", "--steps-per-round", "1", "--warmup", "0",
    )  # fmt: skip
    (entry,) = result["results"]
    # 16 patches, 4 visible: the encoder does ~4x less work, the (equally wide) decoder the same
    assert entry["flops_ratio"] > 1.2
    assert entry["speedup_of_visible_only"] > 0


def test_mae_peer_runs_or_says_unavailable(capsys, tmp_path):
    result = run(
        capsys, mae_peer.main, "--tiny", "--peer-path", str(tmp_path / "nothing"),
        "--rounds", "1", "--steps-per-round", "1", "--warmup", "0",
    )  # fmt: skip
    (entry,) = result["results"]
    assert entry["timing"]["ours"]["items_per_s"] > 0
    if importlib.util.find_spec("transformers") is None:
        assert entry["peer"].startswith("peer unavailable")
        assert "speedup_over_peer" not in entry
    else:  # same config, so the same parameter count
        assert entry["parameters"]["ours"] == entry["parameters"]["hf_vitmae"]
        assert entry["speedup_over_peer"] > 0


def test_loader_against_training_consumption(capsys, shards):
    result = run(
        capsys, loader.main, "--shards", shards["train"], "--objectives", "mae,clip",
        "--workers", "1", "--batches", "3", "--stage-samples", "16", "--steps", "1", "--tiny",
    )  # fmt: skip
    for entry in result["results"]:
        (measured,) = entry["loader"]
        assert measured["workers"] == 1 and measured["images_per_s"] > 0
        assert measured["times_training_consumption"] > 0
        assert set(entry["stages"]["us_per_image"]) == {
            "tar_read",
            "jpeg_decode",
            "transform",
            "collate",
        }


def test_loader_without_shards_is_one_line_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        loader.main(["--shards", str(tmp_path / "missing.tar"), "--tiny"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("error: shard not found")


def test_probe_cached_and_per_epoch_agree(capsys, shards):
    result = run(
        capsys, probe.main, "--train-shards", shards["train"], "--val-shards", shards["val"],
        "--train-samples", "64", "--val-samples", "32", "--epochs", "2", "--batch-size", "16",
        "--tiny",
    )  # fmt: skip
    measured = result["result"]
    assert measured["train_samples"] == 64 and measured["val_samples"] == 32
    assert 0 <= measured["cached"]["top1"] <= 1
    # same features, heads, order and schedule: at most one of 32 predictions may differ
    assert abs(measured["top1_difference_points"]) <= 100 / 32 + 1e-9
    assert measured["speedup"] > 0


def test_checkpointing_reports_both_cases(capsys):
    result = run(capsys, checkpointing.main, "--tiny")
    for case in ("timm_forward_features", "mae_objective"):
        measured = result["result"][case]
        assert measured["off"]["seconds"] > 0 and measured["on"]["seconds"] > 0
        assert measured["time_ratio_on_off"] > 0


def test_speedups_measure_each_group(capsys):
    groups = "optimizer,attention,grad_norm,host_sync,masking,channels_last"
    result = run(
        capsys, speedups.main, "--groups", groups, "--tiny", "--rounds", "1",
        "--steps-per-round", "1", "--warmup", "0", "--cnn-batch", "2",
    )  # fmt: skip
    measured = result["results"]
    assert set(measured) == set(groups.split(","))
    assert list(measured["optimizer"]) == ["project", "foreach", "forloop"]
    assert measured["optimizer"]["project"]["gain_percent"] == 0
    assert 0 < measured["masking"]["share_of_step_percent"] < 100


def test_speedups_unknown_group_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as stopped:
        speedups.main(["--groups", "warp_drive"])
    assert stopped.value.code == 2
    assert "unknown group(s) warp_drive" in capsys.readouterr().err


def test_gpu_script_cpu_dry_run(capsys, tmp_path):
    out = tmp_path / "gpu.json"
    result = run(
        capsys, gpu_h200.main, "--tiny", "--no-compile", "--steps", "1", "--warmup", "0",
        "--out", str(out),
    )  # fmt: skip
    assert json.loads(out.read_text()) == result
    parts = {entry["objective"]: entry for entry in result["results"]}
    assert set(parts) == {"mae", "simclr"}
    assert set(parts["simclr"]["variants"]) == {"eager", "eager_sync", "nhwc"}
    for entry in parts.values():
        assert entry["mixed_precision"] == ("bf16" if torch.cuda.is_available() else "no")
        for measured in entry["variants"].values():
            assert measured["timing"]["mfu"] > 0


def test_gpu_script_skips_what_the_budget_cannot_cover(capsys):
    result = run(capsys, gpu_h200.main, "--tiny", "--no-compile", "--budget-s", "0")
    for entry in result["results"]:
        assert all("skipped" in measured for measured in entry["variants"].values())


@pytest.mark.distributed
def test_fsdp_memory_halves_what_each_process_holds(capsys):
    result = run(capsys, fsdp_memory.main, "--tiny")
    (unsharded,) = result["cases"]["1"]
    total = unsharded["parameters"] + unsharded["optimizer"]
    for held in result["cases"]["2"]:
        assert 0.45 < (held["parameters"] + held["optimizer"]) / total < 0.55


def test_monitor_times_the_knn_evaluation_against_the_step(capsys):
    result = run(capsys, monitor.main, "--tiny", "--rounds", "2", "--steps", "1")
    assert result["benchmark"] == "monitor" and result["subset_samples"] == 32
    assert result["step_s_median"] > 0 and result["knn_s_median"] > 0
    expected = result["knn_s_median"] / (result["monitor_every"] * result["step_s_median"])
    assert result["share_of_step_time"] == pytest.approx(expected)
    steps, every = result["train_steps"], result["monitor_every"]
    assert result["evaluations_per_run"] == 1 + steps // every + (1 if steps % every else 0)


TINY_MAE = [
    "--pretrain-override=model.kwargs={depth: 2, embed_dim: 64, num_heads: 2}",
    "--pretrain-override=mae.decoder_dim=32",
    "--pretrain-override=mae.decoder_depth=1",
    "--pretrain-override=data.batch_size=16",
    "--pretrain-override=data.shuffle_buffer=64",
]


def test_quality_reports_probes_and_full_finetune_beside_random_init(capsys, shards, tmp_path):
    """Toy size on the demo shards: pretrain, linear, kNN, full finetune (pretrained and random
    init on one budget), and a reused run evaluated without pretraining again."""
    common = [
        "--objectives", "mae", "--train", shards["train"], "--test", shards["val"],
        "--steps", "2", "--train-samples", "64", "--output-dir", str(tmp_path / "runs"),
        "--finetune-config", "configs/finetune/demo.yaml", "--full-override=full.epochs=1",
        "--full-override=full.steps_per_epoch=2", "--full-override=full.batch_size=16",
        "--full-override=data.num_workers=0",
    ]  # fmt: skip
    result = run(capsys, quality_cifar10.main, *common, *TINY_MAE)
    (row,) = result["rows"]
    assert row["objective"] == "mae" and row["steps_done"] == 2
    for key in ("linear_top1", "knn_top1", "full_top1"):
        assert 0 <= row[key] <= 1 and 0 <= row[f"{key}_random_init"] <= 1
    budget = row["full_budget"]
    assert budget["epochs"] == 1 and budget["steps_per_epoch"] == 2 and budget["global_batch"] == 16
    # the full finetune's result carried the linear probe the benchmark ran just before it
    assert row["full_linear_probe_top1"] == row["linear_top1"]
    assert isinstance(row["full_warnings"], list)
    assert isinstance(row["full_warnings_random_init"], list)  # the baseline's warnings beside

    reused = run(
        capsys, quality_cifar10.main, *common, "--no-full", f"--reuse=mae={row['run_dir']}"
    )["rows"][0]
    assert reused["reused"] and reused["run_dir"] == row["run_dir"] and "full_top1" not in reused
    assert reused["linear_top1"] == row["linear_top1"]  # the same encoder, the same probe


def test_finetune_sweep_runs_each_point_on_one_budget(capsys, tiny_run, tmp_path):
    """Two points on a 2-step MAE export, one of them random init: one row each, the same
    budget, the first epoch's loss against ln(classes), no errors."""
    assert pretrain_main([*tiny_run, "train.steps=2", "train.run_name=sweep"]) == 0
    capsys.readouterr()
    budget = "--workers 0 --epochs 1 --batch-size 16"
    points = ["full.steps_per_epoch=2 full.blr=1e-3", "random:full.steps_per_epoch=2"]
    result = run(
        capsys, finetune_sweep.main, "--encoder", str(tmp_path / "runs" / "sweep"),
        "--config", "configs/finetune/demo.yaml", "--extra", budget,
        "--work-dir", str(tmp_path / "sweep"), *[f"--point={point}" for point in points],
    )  # fmt: skip
    first, second = result["rows"]
    assert [first["point"], second["point"]] == points
    assert (first["random_init"], second["random_init"]) == (False, True)
    for row in (first, second):
        assert "error" not in row and 0 <= row["top1"] <= 1
        assert (row["epochs"], row["steps_per_epoch"], row["global_batch"]) == (1, 2, 16)
        assert row["epoch1_loss_over_chance"] == pytest.approx(
            row["epoch1_train_loss"] / math.log(6), abs=1e-3
        )
    assert first["lr"] == pytest.approx(1e-3 * 16 / 256)
