import io
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import timm
import torch
from helpers import PYTHON, free_port, python_env
from PIL import Image
from safetensors.torch import load_file

from finetune.__main__ import main as finetune_main
from finetune.config import FullConfig
from finetune.encoder import locate_encoder
from finetune.full import build_optimizer
from finetune.guards import cached_linear_probe, chance_level_warning
from pretrain.__main__ import main as pretrain_main
from pretrain.data import write_shards
from pretrain.optim import set_learning_rate


def test_layer_decay_follows_timm_block_numbering():
    """timm convention (BEiT/MAE): with depth d, blocks.i trains at lr * decay ** (d - i); the
    stem (patch_embed, pos_embed, cls_token) one step below blocks.0, at decay ** (d + 1); the
    final norm with the last block (decay ** 1); the head at lr itself."""
    depth, decay, base_lr = 4, 0.5, 1e-3
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=depth, embed_dim=32,
        num_heads=2, num_classes=5,
    )  # fmt: skip
    optimizer = build_optimizer(model, FullConfig(layer_decay=decay), base_lr)
    set_learning_rate(optimizer, base_lr)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    decay_of = {
        id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]
    }
    seen_blocks = set()
    for name, parameter in model.named_parameters():
        lr = lr_of[id(parameter)]
        if name.startswith("blocks."):
            block = int(name.split(".")[1])
            seen_blocks.add(block)
            assert lr == pytest.approx(base_lr * decay ** (depth - block)), name
        elif name.startswith(("patch_embed", "pos_embed", "cls_token")):
            assert lr == pytest.approx(base_lr * decay ** (depth + 1)), name
        elif name.startswith("norm"):  # timm groups the final norm with the last block
            assert lr == pytest.approx(base_lr * decay), name
        else:
            assert name.startswith("head"), name
            assert lr == pytest.approx(base_lr), name
        no_decay = parameter.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert decay_of[id(parameter)] == (0.0 if no_decay else 0.05), name
    assert seen_blocks == set(range(depth))


def test_full_finetune_cli_trains_evaluates_checkpoints_and_exports(tiny_run, tmp_path, capsys):
    assert pretrain_main([*tiny_run, "train.steps=2", "train.run_name=full"]) == 0
    capsys.readouterr()
    run_dir, output = tmp_path / "runs" / "full", tmp_path / "finetuned"
    arguments = [
        "full", "--encoder", str(run_dir), "--workers", "0", "--no-wandb", "--output",
        str(output), "--epochs", "1", "--batch-size", "16",
        "full.steps_per_epoch=3", "full.mixup=0.8", "full.cutmix=1.0", "full.drop_path=0.1",
    ]  # fmt: skip
    assert finetune_main(arguments) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mode"] == "full" and result["steps_per_epoch"] == 3
    assert len(result["history"]) == 1 and 0 <= result["top1"] <= 1
    assert result["history"][0]["val_top1"] == result["top1"]
    assert (output / "full" / "checkpoints").is_dir() and (output / "full_confusion.png").is_file()
    assert json.loads((output / "full.json").read_text()) == result

    # The finetuned classifier rebuilds with plain timm and loads strictly.
    card = json.loads((output / "full" / "export" / "encoder.json").read_text())
    model = timm.create_model(card["timm_name"], **card["timm_kwargs"])
    model.load_state_dict(load_file(output / "full" / "export" / "encoder.safetensors"))
    assert card["num_classes"] == 6 and model(torch.zeros(2, 3, 32, 32)).shape == (2, 6)
    # The pretrained trunk went in: patch embedding weights moved only by finetuning's small lr.
    pretrained = load_file(run_dir / "export" / "encoder.safetensors")
    finetuned = model.state_dict()["patch_embed.proj.weight"]
    assert (finetuned - pretrained["patch_embed.proj.weight"]).abs().max() < 1e-2

    # Started again without --resume: refuses; with it, the finished run is only evaluated.
    assert finetune_main(arguments) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert finetune_main([*arguments, "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["top1"] == result["top1"] and resumed["history"] == result["history"]


def test_full_finetune_of_a_conv_encoder_and_its_drop_path_error(demo_dir, tmp_path, capsys):
    """SimCLR's demo encoder (dcgan_encoder, no stochastic depth) finetunes end to end with the
    shipped demo recipe; asking it for drop path is one line naming the setting."""
    pretrain = [
        "--config", "configs/pretrain/demo_simclr.yaml", f"data.demo_dir={demo_dir}",
        "data.demo_train_samples=256", "data.demo_val_samples=64", "data.batch_size=16",
        "data.num_workers=0", "data.shuffle_buffer=64", "model.kwargs={width: 8, depth: 2}",
        "train.steps=2", "logging.wandb=false", f"train.output_dir={tmp_path / 'runs'}",
        "train.run_name=conv",
    ]  # fmt: skip
    assert pretrain_main(pretrain) == 0
    common = [
        "full", "--encoder", str(tmp_path / "runs" / "conv"), "--config",
        "configs/finetune/demo.yaml", "--workers", "0", "--no-wandb", "--epochs", "1",
        "--batch-size", "16", "--compare-random-init",
    ]  # fmt: skip
    capsys.readouterr()
    assert finetune_main([*common, "--output", str(tmp_path / "a"), "full.steps_per_epoch=2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["objective"] == "simclr" and 0 <= result["top1"] <= 1
    assert 0 <= result["random_init_top1"] <= 1
    assert finetune_main([*common, "--output", str(tmp_path / "b"), "full.drop_path=0.1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == "error: dcgan_encoder has no drop path; set full.drop_path=0"
    assert not (tmp_path / "b" / "full" / "checkpoints").exists()  # nothing half-written


@pytest.mark.distributed
def test_full_finetune_on_two_processes(tiny_run, tmp_path, capsys):
    assert pretrain_main([*tiny_run, "train.steps=1", "train.run_name=ddp"]) == 0
    capsys.readouterr()
    output = tmp_path / "finetuned"
    command = [
        PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()),
        "--mixed_precision", "no", "-m", "finetune", "full",
        "--encoder", str(tmp_path / "runs" / "ddp"), "--workers", "0", "--no-wandb",
        "--output", str(output), "--epochs", "2", "--batch-size", "8",
        "full.steps_per_epoch=2",
    ]  # fmt: skip
    result = subprocess.run(
        command, env=python_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only the main process reports
    summary = json.loads(lines[0])
    assert summary["processes"] == 2 and summary["global_batch"] == 16
    assert [entry["epoch"] for entry in summary["history"]] == [1, 2]
    # Evaluation counted each of the 64 demo val samples once across both processes.
    assert summary["val_samples"] == 64


# ----------------------------------------------------------------------------------------------
# Guard rails: the chance-level warning and the encoder's own linear probe beside the result


def test_chance_level_warning_names_the_lr_and_the_knob():
    chance = math.log(6)
    settings = FullConfig(blr=1e-3)
    stuck = chance_level_warning(chance * 0.995, 6, 2.5e-4, settings)
    assert stuck.startswith("warning:") and "\n" not in stuck
    assert "chance level ln(6) = 1.792" in stuck and "lr 0.00025" in stuck
    assert "raise full.blr" in stuck and "full.blr 0.001 x global batch / 256" in stuck
    assert chance_level_warning(chance * 0.9, 6, 2.5e-4, settings) is None
    assert chance_level_warning(chance * 0.985, 6, 2.5e-4, settings) is None
    # a stuck run's tail wobbles around ln C: just above it still reads as "raise"
    assert "raise full.blr" in chance_level_warning(chance * 1.002, 6, 2.5e-4, settings)
    too_large = chance_level_warning(chance * 1.01, 6, 0.3, settings)
    assert "above the chance level" in too_large and "lr 0.3 (= full.blr" in too_large
    assert "lower full.blr" in too_large
    absolute = chance_level_warning(chance, 6, 1e-6, FullConfig(lr=1e-6))
    assert "raise full.lr" in absolute and "blr" not in absolute


@pytest.fixture
def colour_shards(tmp_path) -> tuple[str, str]:
    """Train/val shards whose class is the image's colour: learnable within one short epoch."""
    colours = [(220, 40, 40), (40, 200, 60), (50, 80, 230)]
    generator = np.random.default_rng(0)

    def samples(split: str, count: int):
        for number in range(count):
            label = number % len(colours)
            pixels = np.clip(colours[label] + generator.normal(0, 25, (32, 32, 3)), 0, 255)
            buffer = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
            yield {"__key__": f"{split}-{number:05d}", "png": buffer.getvalue(), "cls": label}

    folder = tmp_path / "colours"
    names = ["red", "green", "blue"]
    for split, count in (("train", 192), ("val", 48)):
        write_shards(samples(split, count), folder, split, class_names=names, progress=False)
    return str(folder / "train-index.json"), str(folder / "val-index.json")


def test_full_finetune_warns_at_chance_and_carries_the_linear_probe(
    tiny_run, colour_shards, tmp_path, capsys
):
    assert pretrain_main([*tiny_run, "train.steps=2", "train.run_name=guard"]) == 0
    capsys.readouterr()
    train, val = colour_shards
    output = tmp_path / "eval"

    def finetune(lr: float, folder) -> tuple[dict, str]:
        arguments = [
            "full", "--encoder", str(tmp_path / "runs" / "guard"), "--train", train, "--val", val,
            "--workers", "0", "--no-wandb", "--output", str(folder), "--epochs", "1",
            "--batch-size", "16", "full.steps_per_epoch=12", f"full.lr={lr}",
            "full.warmup_epochs=0", "full.drop_path=0.0", "full.label_smoothing=0.0",
        ]  # fmt: skip
        assert finetune_main(arguments) == 0
        captured = capsys.readouterr()
        return json.loads(captured.out.strip().splitlines()[-1]), captured.err

    # A tiny lr leaves the loss at ln 3: one line on stderr and in the result, naming lr and knob.
    stuck, err = finetune(1e-9, output / "stuck")
    (line,) = [text for text in err.splitlines() if text.startswith("warning:")]
    assert "chance level ln(3)" in line and "lr 1e-09" in line and "raise full.lr" in line
    assert stuck["warnings"] == [line]
    assert stuck["history"][0]["train_loss"] > 0.97 * math.log(3)
    # No probe result in that folder: the field says so.
    assert stuck["linear_probe_top1"] is None

    # A linear probe in the output folder first: the working run carries its top-1.
    probe_arguments = [
        "linear", "--encoder", str(tmp_path / "runs" / "guard"), "--train", train, "--val", val,
        "--workers", "0", "--no-wandb", "--output", str(output), "--epochs", "5",
    ]  # fmt: skip
    assert finetune_main(probe_arguments) == 0
    probe = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    working, err = finetune(3e-3, output)
    assert "warning:" not in err and working["warnings"] == []
    assert working["history"][0]["train_loss"] < 0.97 * math.log(3)
    assert working["linear_probe_top1"] == probe["top1"]
    assert working["linear_probe_result"] == str(output / "linear.json")
    assert working["linear_probe_pool"] == probe["pool"]

    # A probe older than the export (pretraining rerun since) no longer counts.
    weights = tmp_path / "runs" / "guard" / "export" / "encoder.safetensors"
    later = (output / "linear.json").stat().st_mtime_ns + 10**9
    os.utime(weights, ns=(later, later))
    again, _ = finetune(3e-3, tmp_path / "other")
    assert again["linear_probe_top1"] is None
    shutil.copy(output / "linear.json", tmp_path / "other" / "linear.json")
    os.utime(tmp_path / "other" / "linear.json", ns=(later - 1, later - 1))
    source = locate_encoder(tmp_path / "runs" / "guard")
    assert cached_linear_probe(tmp_path / "other", source, False, 48)["linear_probe_top1"] is None
    os.utime(tmp_path / "other" / "linear.json", ns=(later + 1, later + 1))
    fresh = cached_linear_probe(tmp_path / "other", source, False, 48)
    assert fresh["linear_probe_top1"] == probe["top1"]
    # ... and only for the same val set and the same (pretrained, not random-init) encoder
    assert cached_linear_probe(tmp_path / "other", source, False, 47)["linear_probe_top1"] is None
    assert cached_linear_probe(tmp_path / "other", source, True, 48)["linear_probe_top1"] is None
