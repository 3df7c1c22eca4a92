import json

import torch

from finetune.__main__ import main as finetune_main
from finetune.knn import knn_evaluate, knn_scores
from finetune.linear import train_linear_probe
from pretrain.__main__ import main as pretrain_main


def separable_features(samples: int, classes: int = 4, dim: int = 16, seed: int = 0):
    """Gaussian clusters around well-separated class centres: [N, dim] features, [N] labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * 4
    labels = torch.arange(samples) % classes
    return centres[labels] + torch.randn(samples, dim, generator=generator), labels


def split(features, labels, train: int):
    return features[:train], labels[:train], features[train:], labels[train:]


def shuffled(labels):
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]


def test_probe_separates_separable_features_and_not_shuffled_labels():
    train_x, train_y, val_x, val_y = split(*separable_features(600), train=400)
    result, logits = train_linear_probe(train_x, train_y, val_x, val_y, epochs=20, batch_size=64)
    assert result["top1"] > 0.97
    assert logits.shape == (200, 4) and (logits.argmax(1) == val_y).float().mean() > 0.97
    chance, _ = train_linear_probe(train_x, shuffled(train_y), val_x, val_y, epochs=20)
    assert chance["top1"] < 0.45  # 4 classes: chance is 0.25
    assert [head["lr"] for head in result["per_lr"]] == [0.01, 0.03, 0.1, 0.3, 1.0]


def test_knn_separates_separable_features_and_not_shuffled_labels():
    train_x, train_y, val_x, val_y = split(*separable_features(600, classes=6), train=400)
    result, scores = knn_evaluate(train_x, train_y, val_x, val_y, k=20, temperature=0.07)
    assert result["top1"] > 0.97 and scores.shape == (200, 6)
    chance, _ = knn_evaluate(train_x, shuffled(train_y), val_x, val_y)
    assert chance["top1"] < 0.35  # 6 classes: chance is 0.17


def test_knn_votes_match_a_naive_reference():
    """Each query: sum over its k most cosine-similar training rows of exp(cos / T)."""
    generator = torch.Generator().manual_seed(0)
    train, labels = torch.randn(50, 8, generator=generator), torch.randint(0, 3, (50,))
    queries = torch.randn(7, 8, generator=generator)
    scores = knn_scores(train, labels, queries, num_classes=3, k=5, temperature=0.1, chunk=3)
    for row, query in enumerate(queries):
        cosines = [torch.dot(query, sample) / (query.norm() * sample.norm()) for sample in train]
        nearest = sorted(range(50), key=lambda index: -cosines[index])[:5]
        expected = torch.zeros(3)
        for index in nearest:
            expected[labels[index]] += torch.exp(cosines[index] / 0.1)
        torch.testing.assert_close(scores[row], expected, rtol=1e-4, atol=1e-4)


def test_linear_and_knn_cli_on_a_tiny_run_with_random_init_baseline(tiny_run, tmp_path, capsys):
    assert pretrain_main([*tiny_run, "train.steps=2", "train.run_name=probe"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "probe"
    common = ["--encoder", str(run_dir), "--workers", "0", "--no-wandb"]
    code = finetune_main(["linear", *common, "--epochs", "3", "--compare-random-init"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["objective"] == "mae" and result["steps"] == 2 and not result["random_init"]
    assert 0 <= result["top1"] <= 1 and 0 <= result["random_init_top1"] <= 1
    assert result["train_samples"] == 256 and result["val_samples"] == 64
    assert result["run_dir"] == str(run_dir) and not result["features_cached"]
    eval_dir = run_dir / "eval"
    assert json.loads((eval_dir / "linear.json").read_text()) == result
    baseline = json.loads((eval_dir / "linear_random_init.json").read_text())
    assert baseline["top1"] == result["random_init_top1"] and baseline["steps"] == 0
    assert (eval_dir / "linear_confusion.png").stat().st_size > 0
    assert len(result["per_class_top1"]) == 6  # the demo's six shapes, from the shard index

    # kNN reads the very features the probe cached (same encoder, shards, pooling); this time
    # with W&B, offline (conftest), in the eval folder.
    assert finetune_main(["knn", "--encoder", str(run_dir), "--workers", "0"]) == 0
    knn = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert knn["features_cached"] and knn["k"] == 20 and 0 <= knn["top1"] <= 1
    assert (eval_dir / "knn_confusion.png").is_file()
    assert len(list((eval_dir / "wandb").glob("offline-run-*"))) == 1


def test_train_samples_takes_a_seeded_subset_and_cls_pooling_differs(tiny_run, tmp_path, capsys):
    assert pretrain_main([*tiny_run, "train.steps=1", "train.run_name=subset"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "subset"
    common = ["--encoder", str(run_dir), "--workers", "0", "--no-wandb", "--train-samples", "100"]
    assert finetune_main(["knn", *common, "--output", str(tmp_path / "avg")]) == 0
    avg = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert avg["train_samples"] == 100 and avg["pool"] == "avg"
    assert finetune_main(["knn", *common, "--pool", "cls", "--output", str(tmp_path / "cls")]) == 0
    cls = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cls["pool"] == "cls" and not cls["features_cached"]
    cached = {path.name for folder in ("avg", "cls") for path in (tmp_path / folder).glob("*/*.pt")}
    assert len(cached) == 4  # train + val for each pooling, under different keys


def test_cli_names_a_missing_encoder_and_a_bad_key(tiny_run, tmp_path, capsys):
    assert finetune_main(["linear", "--encoder", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no encoder export at")
    assert finetune_main(["knn", "--encoder", str(tmp_path), "knn.kk=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'knn.kk'" in err[0]
