"""Any encoder into `finetune` (finetune.sources), another resolution than pretraining's, and the
export in timm's Hugging Face Hub layout (pretrain.hub)."""

import argparse
import json
import shutil
import socket

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from finetune.__main__ import main as finetune_main
from finetune.encoder import EncoderNotFound, build_classifier, fit_position_embeddings
from finetune.sources import find_encoder
from pretrain.__main__ import main as pretrain_main
from pretrain.data import ensure_demo_data
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pretrain.errors import ModelError

RUN_KWARGS = "{img_size: 32, patch_size: 4, depth: 2, embed_dim: 64, num_heads: 2}"
IMAGENET = [f"data.mean={list(IMAGENET_MEAN)}", f"data.std={list(IMAGENET_STD)}"]


@pytest.fixture
def mae_run(tiny_run, tmp_path, capsys):
    assert pretrain_main([*tiny_run, "train.steps=2", "train.run_name=mae"]) == 0
    capsys.readouterr()
    return tmp_path / "runs" / "mae"


def result_of(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def probe_args(mode, encoder, demo_dir, *extra):
    shards = ensure_demo_data(demo_dir, 256, 64, 32, seed=0)
    return [mode, "--encoder", str(encoder), "--train", shards["train"], "--val", shards["val"],
            "--workers", "0", "--no-wandb", *extra]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The export in timm's Hub layout


def test_the_export_loads_with_timms_local_dir_loader(mae_run):
    export = mae_run / "export"
    model = timm.create_model(f"local-dir:{export}", pretrained=True)
    exported = load_file(export / "encoder.safetensors")
    assert set(model.state_dict()) == set(exported)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, exported[name]), name
    assert model.num_classes == 0 and model.patch_embed.img_size == (32, 32)
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 32, 32) and tuple(data["mean"]) == IMAGENET_MEAN
    config = json.loads((export / "config.json").read_text())
    assert "tag" not in config["pretrained_cfg"] and "license" not in config["pretrained_cfg"]
    assert (export / "model.safetensors").read_bytes() == (
        export / "encoder.safetensors"
    ).read_bytes()
    assert "library_name: timm" in (export / "README.md").read_text()


def test_publish_needs_a_token_and_uploads_only_the_hub_files(mae_run, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert pretrain_main(["publish", str(mae_run), "--repo", "me/my-mae"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no Hugging Face token")

    calls = {}

    class FakeApi:  # stands in for the Hub: no network in tests
        def __init__(self, token):
            calls["token"] = token

        def create_repo(self, repo_id, private, exist_ok):
            calls["repo"] = (repo_id, private, exist_ok)
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, **kwargs):
            calls["upload"] = kwargs
            return type("Commit", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert pretrain_main(["publish", str(mae_run), "--repo", "me/my-mae", "--private"]) == 0
    assert calls["token"] == "hf_test" and calls["repo"] == ("me/my-mae", True, True)
    assert calls["upload"]["folder_path"] == mae_run / "export"
    assert calls["upload"]["allow_patterns"] == ["config.json", "model.safetensors", "README.md"]


# ----------------------------------------------------------------------------------------------
# Any encoder into finetune


def test_a_timm_encoder_from_a_weights_file_probes_like_the_run(
    mae_run, demo_dir, tmp_path, capsys
):
    assert finetune_main(probe_args("knn", mae_run, demo_dir)) == 0
    as_run = result_of(capsys)
    weights = load_file(mae_run / "export" / "encoder.safetensors")
    torch.save(weights, tmp_path / "pytorch_model.bin")  # timm's other weights format
    for path in (mae_run / "export" / "encoder.safetensors", tmp_path / "pytorch_model.bin"):
        extra = ["--weights", str(path), "--timm-kwargs", RUN_KWARGS, *IMAGENET]
        assert finetune_main(probe_args("knn", "vit_tiny_patch16_224", demo_dir, *extra)) == 0
        as_timm = result_of(capsys)
        assert as_timm["top1"] == as_run["top1"] and as_timm["encoder"] == str(path)
        assert as_timm["run_dir"] is None
    # A Hub-layout folder (the export without encoder.json) is the same encoder again.
    hub = tmp_path / "hub_copy"
    shutil.copytree(mae_run / "export", hub)
    (hub / "encoder.json").unlink()
    assert finetune_main(probe_args("knn", hub, demo_dir)) == 0
    assert result_of(capsys)["top1"] == as_run["top1"]


def test_weights_that_do_not_fit_or_hold_code_stop_in_one_line(mae_run, tmp_path, capsys):
    other = timm.create_model("resnet18", num_classes=0).state_dict()
    save_file(other, tmp_path / "resnet.safetensors")

    # A training script's checkpoint with its argparse options beside the weights: an object,
    # not a tensor, which weights_only=True refuses to unpickle.
    torch.save({"model": other, "args": argparse.Namespace(lr=0.1)}, tmp_path / "code.pth")
    cases = [
        (["--weights", str(tmp_path / "resnet.safetensors")], "do not fit vit_tiny_patch16_224"),
        (["--weights", str(tmp_path / "code.pth")], "cannot read weights from"),
        (["--weights", str(tmp_path / "missing.bin")], "weights file not found"),
    ]
    for extra, fragment in cases:
        args = ["linear", "--encoder", "vit_tiny_patch16_224", "--timm-kwargs", RUN_KWARGS]
        assert finetune_main([*args, *extra, "--no-wandb"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert finetune_main(["linear", "--encoder", "no_such_model_x", "--no-wandb"]) == 2
    assert "not a timm model name" in capsys.readouterr().err


def fake_hub_cache(root, repo_id: str, files: dict) -> None:
    """The folder layout huggingface_hub's cache uses: models--ORG--NAME/{refs/main,
    snapshots/<commit>/<files>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, write in files.items():
        write(snapshot / name)


def test_a_pretrained_tag_comes_from_the_local_cache_and_never_the_network(
    demo_dir, tmp_path, monkeypatch, capsys
):
    from huggingface_hub import constants

    def no_network(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    torch.manual_seed(3)
    cached = timm.create_model("test_vit.r160_in1k", num_classes=1000).state_dict()  # with head
    fake_hub_cache(tmp_path / "hub", "timm/test_vit.r160_in1k",
                   {"model.safetensors": lambda path: save_file(cached, path)})  # fmt: skip

    source = find_encoder("test_vit.r160_in1k")
    model = source.create(random_init=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, cached[name]), name
    assert source.image_size == 160 and source.mean == (0.5, 0.5, 0.5)  # the tag's own config

    with pytest.raises(EncoderNotFound, match="not in the local Hugging Face cache"):
        find_encoder("test_vit3.r160_in1k")  # absent: one line, no download
    assert finetune_main(["knn", "--encoder", "test_vit3.r160_in1k", "--no-wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hf download timm/test_vit3.r160_in1k" in err[0]
    assert finetune_main(["knn", "--encoder", "test_vit.nosuchtag", "--no-wandb"]) == 2
    assert "no pretrained tag" in capsys.readouterr().err

    # The cached tag, probed at 32 px (its position embeddings resampled from 160 px).
    assert finetune_main(probe_args("linear", "test_vit.r160_in1k", demo_dir, "--epochs", "2",
                                    "data.image_size=32")) == 0  # fmt: skip
    result = result_of(capsys)
    assert result["encoder"] == "test_vit.r160_in1k" and 0 <= result["top1"] <= 1


# ----------------------------------------------------------------------------------------------
# Another resolution than pretraining's


def test_position_embeddings_resample_as_timm_does_and_the_patch_size_stays(mae_run):
    source = find_encoder(str(mae_run))
    pretrained = load_file(mae_run / "export" / "encoder.safetensors")["pos_embed"]  # [1, 1+64, D]
    model, kwargs = build_classifier(source, 6, "avg", random_init=False, image_size=48)
    assert kwargs["img_size"] == 48 and kwargs["patch_size"] == 4
    expected = resample_abs_pos_embed(
        pretrained, new_size=(12, 12), num_prefix_tokens=1, interpolation="bicubic", antialias=True
    )
    assert model.pos_embed.shape == (1, 1 + 144, 64)
    assert torch.equal(model.pos_embed.detach(), expected)
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 6)
    other_patch = timm.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8, depth=2,
                                    embed_dim=64, num_heads=2, num_classes=0)  # fmt: skip
    with pytest.raises(ModelError, match="the patch size cannot change"):
        fit_position_embeddings(other_patch, load_file(mae_run / "export" / "encoder.safetensors"))


def test_full_finetune_and_probe_at_48_px_of_a_32_px_vit(mae_run, tmp_path, capsys):
    output = tmp_path / "at48"
    arguments = [
        "full", "--encoder", str(mae_run), "--workers", "0", "--no-wandb", "--output",
        str(output), "--epochs", "1", "--batch-size", "16", "full.steps_per_epoch=2",
        "data.image_size=48",
    ]  # fmt: skip
    assert finetune_main(arguments) == 0
    result = result_of(capsys)
    assert 0 <= result["top1"] <= 1 and result["val_samples"] == 64
    card = json.loads((output / "full" / "export" / "encoder.json").read_text())
    assert card["image_size"] == 48 and card["timm_kwargs"]["img_size"] == 48
    classifier = timm.create_model(f"local-dir:{output / 'full' / 'export'}", pretrained=True)
    assert classifier(torch.zeros(1, 3, 48, 48)).shape == (1, 6)
    probe = ["linear", "--encoder", str(mae_run), "--workers", "0", "--no-wandb", "--epochs", "2"]
    assert finetune_main([*probe, "data.image_size=48"]) == 0
    assert 0 <= result_of(capsys)["top1"] <= 1
