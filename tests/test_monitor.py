"""The online kNN monitor of pretraining (pretrain.monitor) and the kNN scoring it shares with
`finetune knn` (pretrain.knn)."""

import copy
import io
import json
import subprocess

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import PYTHON, WORKERS, free_port, python_env, train_on_two_ranks
from PIL import Image

from finetune.encoder import set_pooling
from pretrain.__main__ import main as pretrain_main
from pretrain.checkpoint import list_checkpoints, load_checkpoint
from pretrain.data import ensure_demo_data, write_images, write_shards
from pretrain.knn import knn_scores
from pretrain.monitor import pooled_features

TINY_VIT = ["model.kwargs={depth: 2, embed_dim: 32, num_heads: 2}", "model.patch_size=8"]


def naive_leave_one_out(features, labels, classes, k, temperature):
    """Each sample's votes from its k most cosine-similar others, one sample at a time."""
    unit = F.normalize(features.double(), dim=1)
    scores = torch.zeros(len(unit), classes, dtype=torch.float64)
    for query in range(len(unit)):
        others = [j for j in range(len(unit)) if j != query]
        similarity = unit[others] @ unit[query]
        nearest = similarity.topk(k).indices
        for position in nearest.tolist():
            weight = torch.exp(similarity[position] / temperature)
            scores[query, labels[others[position]]] += weight
    return scores


def test_leave_one_out_knn_matches_a_naive_reference():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(23, 8, generator=generator)
    labels = torch.randint(0, 3, (23,), generator=generator)
    scores = knn_scores(features, labels, features, 3, k=5, temperature=0.1, chunk=4,
                        exclude_self=True)  # fmt: skip
    expected = naive_leave_one_out(features, labels, 3, k=5, temperature=0.1)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)
    # Without the exclusion every sample finds itself first (cosine 1): it would vote for itself.
    with_self = knn_scores(features, labels, features, 3, k=1, temperature=0.1)
    assert (with_self.argmax(dim=1) == labels).all()


def test_pooled_features_are_finetunes_frozen_features_without_touching_the_encoder():
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2, embed_dim=32,
        num_heads=2,
    ).eval()  # fmt: skip
    images = torch.randn(3, 3, 32, 32)
    for pool in ("avg", "cls"):
        reference = copy.deepcopy(vit)
        set_pooling(reference, pool)
        torch.testing.assert_close(pooled_features(vit, images, pool), reference(images))
    assert vit.global_pool == "token"  # the live encoder keeps its own pooling
    cnn = timm.create_model("resnet18", num_classes=0).eval()
    torch.testing.assert_close(pooled_features(cnn, images, "avg"), cnn(images))


def run(args, capsys):
    code = pretrain_main(args)
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def knn_lines(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "knn_top1" in line]


def test_monitor_logs_knn_and_changes_nothing_in_training_or_exact_resume(
    tiny_run, tmp_path, capsys
):
    monitor = ["monitor.every=2", "monitor.samples=48"]
    assert run([*tiny_run, "train.run_name=plain"], capsys)[0] == 0
    code, out, _ = run([*tiny_run, *monitor, "train.run_name=watched"], capsys)
    assert code == 0
    watched = tmp_path / "runs" / "watched"
    logged = knn_lines(watched)
    assert [line["step"] for line in logged] == [0, 2, 4, 6]  # before the first step, every 2
    assert all(0 <= line["knn_top1"] <= 1 and line["knn_s"] > 0 for line in logged)
    assert json.loads(out[-1])["knn_top1"] == logged[-1]["knn_top1"]

    # A crash right after the step-3 checkpoint, then --resume: the same weights and values.
    assert run([*tiny_run, *monitor, "train.run_name=broken"], capsys)[0] == 0
    broken = tmp_path / "runs" / "broken"
    for later in list_checkpoints(broken)[1:]:
        for path in later.iterdir():
            path.unlink()
        later.rmdir()
    assert run(["--resume", str(broken)], capsys)[0] == 0
    resumed = knn_lines(broken)[-2:]
    assert [line["step"] for line in resumed] == [4, 6]
    assert [line["knn_top1"] for line in resumed] == [line["knn_top1"] for line in logged[-2:]]
    final = {
        name: load_checkpoint(list_checkpoints(tmp_path / "runs" / name)[-1])[0]
        for name in ("plain", "watched", "broken")
    }
    for name, tensor in final["plain"].items():
        assert torch.equal(tensor, final["watched"][name]), name  # the monitor changes nothing
        assert torch.equal(tensor, final["broken"][name]), name  # and resume stays exact


def make_images(folder, count):
    folder.mkdir(parents=True)
    for number in range(count):
        colour = (number * 37 % 256, number * 11 % 256, 90)
        Image.new("RGB", (32, 32), colour).save(folder / f"img{number}.png")


def test_monitor_without_labelled_data_stops_in_one_line_before_the_run_dir(
    tiny_run, demo_dir, tmp_path, capsys
):
    make_images(tmp_path / "plain", 12)
    write_images(tmp_path / "plain", tmp_path / "shards", progress=False)
    args = [*tiny_run, f"data.train_shards={tmp_path / 'shards'}", "monitor.every=2",
            "train.run_name=mae-unlabelled"]  # fmt: skip
    code, _, err = run(args, capsys)
    assert code == 2 and len(err) == 1, err
    assert "online kNN needs labelled data" in err[0] and "data.train_shards" in err[0]
    assert not (tmp_path / "runs").exists()
    # The class token of a model that has none: also refused before anything starts.
    conv = ["objective.name=autoencoder", "model.name=dcgan_encoder", "model.kwargs={width: 8}"]
    vit_free = [arg for arg in tiny_run if not arg.startswith("model.kwargs")]
    code, _, err = run([*vit_free, *conv, "monitor.every=2", "monitor.pool=cls"], capsys)
    assert code == 2 and len(err) == 1 and "has no class token" in err[0], err
    assert not (tmp_path / "runs").exists()
    # Labelled val shards make the same unlabelled training run monitorable.
    labelled = ensure_demo_data(demo_dir, 256, 64, 32, seed=0)["val"]
    code, _, err = run([*args, f"monitor.shards={labelled}", "train.steps=2"], capsys)
    assert code == 0, err
    assert [line["step"] for line in knn_lines(tmp_path / "runs" / "mae-unlabelled")] == [0, 2]


def labelled_shards(folder, counts):
    """Shards of uneven sizes with labels: a fixed, known set of samples."""
    generator = torch.Generator().manual_seed(1)
    number = 0
    for shard, count in enumerate(counts):
        samples = []
        for _ in range(count):
            pixels = (torch.rand(16, 16, 3, generator=generator) * 255).to(torch.uint8).numpy()
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            samples.append({"__key__": f"s{number:04d}", "png": buffer.getvalue(),
                            "cls": number % 3})  # fmt: skip
            number += 1
        write_shards(samples, folder, prefix=f"part{shard}", progress=False)
    return ",".join(str(folder / f"part{shard}-index.json") for shard in range(len(counts)))


@pytest.mark.distributed
def test_two_processes_embed_each_sample_once_and_give_one_process_result(tmp_path):
    shards = labelled_shards(tmp_path / "shards", [7, 5, 9, 3, 6])
    overrides = ["data.image_size=16", *TINY_VIT, "monitor.samples=20", "monitor.k=4"]
    worker = [str(WORKERS / "monitor_worker.py")]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    single = [PYTHON, *worker, str(tmp_path / "one"), shards, *overrides]
    result = subprocess.run(single, env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    launch = [
        PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
        *worker, str(tmp_path / "two"), shards, *overrides,
    ]  # fmt: skip
    result = subprocess.run(launch, env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    two = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert one["features"].dtype == torch.float64 and one["features"].shape[0] == 20
    for other in two:  # every process holds the whole subset, in the same order
        torch.testing.assert_close(other["features"], one["features"], rtol=0, atol=1e-12)
        assert torch.equal(other["labels"], one["labels"])
        assert other["top1"] == one["top1"]


@pytest.mark.distributed
def test_a_monitored_run_on_two_processes(tiny_run, tmp_path):
    rank0, rank1, _ = train_on_two_ranks(
        tmp_path, [*tiny_run, "train.run_name=ddp", "train.steps=4", "monitor.every=2"]
    )
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name
    assert [line["step"] for line in knn_lines(tmp_path / "runs" / "ddp")] == [0, 2, 4]
