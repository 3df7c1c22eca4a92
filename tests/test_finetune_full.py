import json
import subprocess

import pytest
import timm
import torch
from helpers import PYTHON, free_port, python_env
from safetensors.torch import load_file

from finetune.__main__ import main as finetune_main
from finetune.config import FullConfig
from finetune.full import build_optimizer
from pretrain.__main__ import main as pretrain_main
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
