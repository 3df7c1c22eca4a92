import json

import torch

from finetune.__main__ import main as finetune_main
from finetune.linear import train_linear_probe
from pretrain.__main__ import main as pretrain_main


def separable_features(samples: int, classes: int = 4, dim: int = 16):
    """Gaussian clusters around well-separated class centres: [N, dim] features, [N] labels."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=generator) * 4
    labels = torch.arange(samples) % classes
    return centres[labels] + torch.randn(samples, dim, generator=generator), labels


def test_probe_separates_separable_features_and_not_shuffled_labels():
    features, labels = separable_features(600)
    train_x, train_y, val_x, val_y = features[:400], labels[:400], features[400:], labels[400:]
    result = train_linear_probe(train_x, train_y, val_x, val_y, epochs=20, batch_size=64)
    assert result["top1"] > 0.97
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    chance = train_linear_probe(train_x, shuffled, val_x, val_y, epochs=20, batch_size=64)
    assert chance["top1"] < 0.45  # 4 classes: chance is 0.25
    assert [head["lr"] for head in result["per_lr"]] == [0.01, 0.03, 0.1, 0.3, 1.0]


def test_linear_cli_on_a_tiny_run_with_random_init_baseline(tiny_run, tmp_path, capsys):
    assert pretrain_main([*tiny_run, "train.steps=2", "train.run_name=probe"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "probe"
    code = finetune_main(
        [
            "linear",
            "--encoder",
            str(run_dir),
            "--epochs",
            "3",
            "--workers",
            "0",
            "--compare-random-init",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["objective"] == "mae" and result["steps"] == 2
    assert 0 <= result["probe_top1"] <= 1 and 0 <= result["random_init_probe_top1"] <= 1
    assert result["run_dir"] == str(run_dir)
    assert json.loads((run_dir / "eval" / "linear.json").read_text()) == result


def test_linear_cli_names_a_missing_encoder(tmp_path, capsys):
    assert finetune_main(["linear", "--encoder", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no encoder export at")
