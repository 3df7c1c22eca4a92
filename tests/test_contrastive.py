"""SimCLR and CLIP objectives: augmentations, caption data, logit scale, LARS, CLI runs, and the
proof that W processes train like one process on the global batch."""

import json
import math
import subprocess

import pytest
import torch
from helpers import PYTHON, WORKERS, free_port, python_env, train_on_two_ranks
from PIL import Image

from pretrain.__main__ import main as pretrain_main
from pretrain.config import ConfigError, load_config
from pretrain.data import (
    collate,
    ensure_demo_data,
    eval_loader,
    train_loader,
    write_captions,
    write_imagefolder,
)
from pretrain.data.view_params import VIEW_PARAMS
from pretrain.objectives import build_objective
from pretrain.objectives.simclr import simclr_train_transform
from pretrain.optim import LARS, build_optimizer

TINY_VIT = "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}"
TINY_TEXT = [
    "clip.embed_dim=16",
    "clip.context_length=16",
    "clip.text_width=32",
    "clip.text_layers=1",
    "clip.text_heads=2",
]


# --- data: two views, captions ------------------------------------------------------------------


def test_simclr_transform_gives_two_different_crops_and_their_colour_params():
    config = load_config(None, ["objective.name=simclr"])
    transform = simclr_train_transform(config)
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    image.paste((20, 20, 220), (0, 0, 16, 32))
    torch.manual_seed(0)
    out = transform({"image": image, "label": 3})
    assert out["image"].shape == out["image2"].shape == (3, 32, 32) and out["label"] == 3
    assert out["view_params"].shape == out["view_params2"].shape == (VIEW_PARAMS,)
    assert not torch.equal(out["image"], out["image2"])
    torch.manual_seed(0)
    again = transform({"image": image, "label": 3})
    assert all(torch.equal(out[key], again[key]) for key in out if key != "label")


def test_simclr_loader_batches_hold_normalized_float_views(demo_dir):
    config = load_config(None, ["objective.name=simclr"])
    shards = ensure_demo_data(demo_dir, 256, 64, 32, seed=0, progress=False)["train"]
    loader = train_loader(
        shards,
        simclr_train_transform(config),
        batch_size=8,
        steps_per_epoch=1,
        epoch=0,
        seed=0,
        rank=0,
        world_size=1,
        num_workers=0,
        shuffle_buffer=16,
    )
    (batch,) = list(loader)
    for key in ("image", "image2"):
        assert batch[key].dtype == torch.float32 and batch[key].shape == (8, 3, 32, 32)
        # ImageNet-normalized pixels of [0, 1] images: within [-2.2, 2.7]
        assert -2.2 < batch[key].min() and batch[key].max() < 2.7
    assert batch["view_params"].shape == (8, VIEW_PARAMS)


def test_simclr_objective_augments_views_on_its_device_and_blurs_by_image_size():
    small = build_objective(load_config(None, ["objective.name=simclr", TINY_VIT]))[0]
    large = build_objective(
        load_config(None, ["objective.name=simclr", TINY_VIT, "data.image_size=224"])
    )[0]
    forced = build_objective(
        load_config(None, ["objective.name=simclr", TINY_VIT, "simclr.blur_p=0.5"])
    )[0]
    assert small.blur_kernel == 0 and forced.blur_kernel == 3
    assert large.blur_kernel == 23  # ~10% of the side, odd
    assert "pixel_mean" not in small.state_dict()  # constants stay out of checkpoints

    transform = simclr_train_transform(load_config(None, ["objective.name=simclr"]))
    torch.manual_seed(0)
    images = [Image.new("RGB", (40, 36), (10 * i, 200 - 20 * i, 90)) for i in range(4)]
    samples = [transform({"image": image, "key": str(i)}) for i, image in enumerate(images)]
    batch = transform.finish_batch(collate(samples))
    out = small(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    # the colour-op groups from the worker and those worked out in the step agree
    regrouped = {key: value for key, value in batch.items() if not key.startswith("view_jitter")}
    assert torch.allclose(small(regrouped)["loss"], out["loss"])
    # without the parameters the views go to the encoder as they are: another loss
    plain = {key: value for key, value in batch.items() if not key.startswith("view_params")}
    assert not torch.allclose(small(plain)["loss"], out["loss"])


def _three_class_folder(root):
    for index, (name, colour) in enumerate(
        [("red_car", (200, 0, 0)), ("dog", (0, 200, 0)), ("sky", (0, 0, 200))]
    ):
        (root / name).mkdir(parents=True)
        for copy in range(3):
            Image.new("RGB", (16, 16), colour).save(root / name / f"{index}_{copy}.png")


def _read_all(folder) -> list[tuple[str, int | None]]:
    """(caption, label) of every sample in the shards of `folder`."""

    def keep_text(sample):
        return {"caption": sample["caption"], "label": sample.get("label", -1)}

    pairs = []
    for batch in eval_loader(str(folder), keep_text, 4, rank=0, world_size=1, num_workers=0):
        pairs += zip(batch["caption"], batch["label"].tolist())
    return pairs


def test_caption_shards_round_trip_through_writer_and_reader(tmp_path):
    # ImageFolder + caption template
    _three_class_folder(tmp_path / "folder")
    write_imagefolder(
        tmp_path / "folder", tmp_path / "templ", progress=False, caption_template="a photo of a {}."
    )
    samples = _read_all(tmp_path / "templ")
    assert len(samples) == 9
    for caption, label in samples:
        # classes are the sorted folder names
        assert caption == f"a photo of a {['dog', 'red car', 'sky'][label]}."
    with pytest.raises(Exception, match="must contain"):
        write_imagefolder(tmp_path / "folder", tmp_path / "bad", caption_template="no slot")

    # Caption list (CSV) with unicode text
    rows = ["image,caption"]
    for index in range(4):
        Image.new("RGB", (16, 16), (index * 60, 0, 0)).save(tmp_path / f"img{index}.png")
        rows.append(f"img{index}.png,un café numéro {index}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    write_captions(tmp_path / "list.csv", tmp_path / "caps", progress=False)
    captions = sorted(caption for caption, _ in _read_all(tmp_path / "caps"))
    assert captions == [f"un café numéro {index}" for index in range(4)]


def test_clip_transform_tokenizes_captions(demo_dir):
    config = load_config(None, ["objective.name=clip", "clip.context_length=12"])
    from pretrain.objectives.clip import clip_train_transform

    transform = clip_train_transform(config)
    from pretrain.data import ensure_demo_data

    shards = ensure_demo_data(demo_dir, 256, 64, 32, seed=0)["train"]
    sample = next(iter(eval_loader(shards, transform, 4, rank=0, world_size=1, num_workers=0)))
    assert sample["image"].shape == (4, 3, 32, 32)
    assert sample["text"].shape == (4, 12) and sample["text"].dtype == torch.int64
    assert (sample["text"][:, 0] == 49406).all()  # CLIP's start-of-text token


# --- models ---------------------------------------------------------------------------------------


def test_clip_logit_scale_starts_at_one_over_007_and_is_clamped_at_100():
    config = load_config(None, ["objective.name=clip", "model.patch_size=8", TINY_VIT, *TINY_TEXT])
    clip, _ = build_objective(config)
    assert clip.log_logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert clip.logit_scale().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        clip.log_logit_scale.fill_(10.0)
    scale = clip.logit_scale()
    assert scale.item() == pytest.approx(100.0)
    scale.backward()
    assert clip.log_logit_scale.grad.item() == 0.0  # no push beyond the clamp
    siglip, _ = build_objective(
        load_config(None, ["objective.name=clip", "clip.loss=siglip", TINY_VIT, *TINY_TEXT])
    )
    assert siglip.logit_scale().item() == pytest.approx(10.0)
    assert siglip.logit_bias.item() == -10.0


def test_clip_encoders_give_unit_vectors_and_the_batch_dict_contract():
    config = load_config(None, ["objective.name=clip", "model.patch_size=8", TINY_VIT, *TINY_TEXT])
    clip, _ = build_objective(config)
    tokens = clip.tokenize(["a red circle", "a blue square"])
    text = clip.encode_text(tokens)
    image = clip.encode_image(torch.randn(2, 3, 32, 32))
    assert text.shape == image.shape == (2, 16)
    assert torch.allclose(text.norm(dim=1), torch.ones(2))
    out = clip({"image": torch.randn(4, 3, 32, 32), "text": clip.tokenize(["a", "b", "c", "d"])})
    assert {"loss", "logit_scale", "pos_sim", "neg_sim", "top1_image_to_text"} <= set(out)


def test_simclr_projection_head_layout_and_bad_settings():
    config = load_config(
        None,
        ["objective.name=simclr", "model.patch_size=8", TINY_VIT, "simclr.projection_layers=3"],
    )
    simclr, _ = build_objective(config)
    layers = [type(layer).__name__ for layer in simclr.projection]
    assert layers == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert simclr.projection[-1].bias is None
    with pytest.raises(ConfigError, match="simclr.negatives"):
        build_objective(load_config(None, ["objective.name=simclr", "simclr.negatives=some"]))
    with pytest.raises(ConfigError, match="clip.loss"):
        build_objective(load_config(None, ["objective.name=clip", "clip.loss=hinge", *TINY_TEXT]))


# --- LARS -----------------------------------------------------------------------------------------


def test_lars_scales_weights_by_the_trust_ratio_and_leaves_biases_and_norms_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    settings = load_config(None, ["optimizer.name=lars", "optimizer.weight_decay=0.1"]).optimizer
    optimizer = build_optimizer(list(model.named_parameters()), set(), settings, lr=0.5)
    assert isinstance(optimizer, LARS)
    excluded = {id(p) for g in optimizer.param_groups if g["lars_exclude"] for p in g["params"]}
    assert excluded == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(torch.randn(5, 4)).pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    # weight: g + wd * w, scaled by eta * |w| / |g + wd * w|
    update = grads["0.weight"] + 0.1 * before["0.weight"]
    trust = 0.001 * before["0.weight"].norm() / update.norm()
    assert torch.allclose(model[0].weight, before["0.weight"] - 0.5 * trust * update)
    # bias and norm parameters: plain step, no decay, no trust ratio
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.allclose(
            dict(model.named_parameters())[name], before[name] - 0.5 * grads[name]
        )


def test_unknown_optimizer_is_a_config_error():
    expected = "'optimizer.name' must be one of adamw, lars; got 'sgdx'"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["optimizer.name=sgdx"])


# --- W processes == one process ------------------------------------------------------------------


def _one_step(tmp_path, name: str, negatives: str, processes: int) -> dict:
    out_file = tmp_path / f"{name}-{negatives}-{processes}.pt"
    command = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(free_port()),
        str(WORKERS / "contrastive_objective_worker.py"), str(out_file), name, negatives,
    ]  # fmt: skip
    result = subprocess.run(
        command, env=python_env(), capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_file, weights_only=True)


def _assert_same(one: dict, two: dict) -> None:
    assert torch.allclose(one["loss"], two["loss"], rtol=0, atol=1e-10), (one["loss"], two["loss"])
    for part in ("grads", "params"):
        assert one[part].keys() == two[part].keys()
        for key, value in one[part].items():
            gap = (value - two[part][key]).abs().max().item()
            assert gap <= 1e-10, f"{part} of {key} differ by {gap:.3g}"


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["simclr", "clip"])
def test_two_processes_train_exactly_like_one_on_the_global_batch(tmp_path, name):
    single = _one_step(tmp_path, name, "global", 1)
    double = _one_step(tmp_path, name, "global", 2)
    _assert_same(single, double)
    # Per-process negatives are a different loss: each process sees half the candidates.
    local = _one_step(tmp_path, name, "local", 2)
    assert (local["loss"] - single["loss"]).abs().item() > 1e-3
    gap = max((local["grads"][k] - single["grads"][k]).abs().max().item() for k in single["grads"])
    assert gap > 1e-6


# --- CLI runs -------------------------------------------------------------------------------------


def _tiny(tiny_run, name):
    overrides = [o for o in tiny_run if not o.startswith(("mae.", "model.kwargs"))]
    overrides += [f"objective.name={name}", "model.patch_size=8", TINY_VIT, "logging.image_every=0"]
    if name == "clip":
        overrides += TINY_TEXT
    else:
        overrides += ["simclr.projection_hidden_dim=32", "simclr.projection_dim=16"]
    return overrides


@pytest.mark.parametrize("name", ["simclr", "clip"])
def test_cli_smoke_run_logs_contrastive_metrics(tiny_run, tmp_path, capsys, name):
    code = pretrain_main([*_tiny(tiny_run, name), f"train.run_name={name}"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    summary = json.loads(out[-1])
    assert summary["objective"] == name and math.isfinite(summary["final_loss"])
    run_dir = tmp_path / "runs" / name
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = {"loss", "pos_sim", "neg_sim"}
    expected |= {"temperature", "top1"} if name == "simclr" else {"logit_scale"}
    assert expected <= set(metrics[-1])
    assert (run_dir / "export" / "encoder.safetensors").is_file()


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["simclr", "clip"])
def test_two_process_cli_run_keeps_replicas_identical(tiny_run, tmp_path, name):
    overrides = [*_tiny(tiny_run, name), f"train.run_name={name}", "train.steps=4"]
    rank0, rank1, _ = train_on_two_ranks(tmp_path, overrides)
    for key, tensor in rank0.items():
        # BatchNorm running statistics are per process (DDP re-broadcasts them from rank 0 at
        # each forward); the weights are what must match.
        if "running_" not in key and "num_batches_tracked" not in key:
            assert torch.equal(tensor, rank1[key]), key
    metrics = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 4
