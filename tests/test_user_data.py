"""The user's own data: unlabelled folders and path lists, img2dataset-layout shards written by
other tools, the messages bad input gets, and pretraining on all of it."""

import io
import json
import logging
import os
import tarfile

import pytest
import torch
from PIL import Image

from finetune.__main__ import main as finetune_main
from pretrain.__main__ import main as pretrain_main
from pretrain.data import (
    DataError,
    eval_loader,
    expand_shards,
    write_image_list,
    write_images,
    write_shards,
)
from pretrain.data.cli import main as shards_main
from pretrain.data.transforms import eval_transform

DCGAN = ["model.name=dcgan_encoder", "model.kwargs={width: 8, depth: 3}"]
TINY_GENERATIVE = [
    "autoencoder.latent_dim=16", "autoencoder.decoder_width=8", "vae.latent_dim=8",
    "vae.decoder_width=8", "vae.sample_grid=4", "vae.traversal_dims=3", "gan.noise_dim=16",
    "gan.generator_width=8", "gan.sample_grid=4",
]  # fmt: skip
TINY_CLIP = [
    "objective.name=clip", "clip.embed_dim=16", "clip.context_length=24", "clip.text_width=32",
    "clip.text_layers=1", "clip.text_heads=2",
]  # fmt: skip


def encoded(seed: int, file_format: str, size: int = 32) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=file_format)
    return buffer.getvalue()


def truncated_jpeg(seed: int) -> bytes:
    """A JPEG cut inside its scan data: Pillow's verify() passes it, decoding fails."""
    return encoded(seed, "JPEG", size=64)[:-200]


def plain_folder(root, count: int) -> None:
    root.mkdir(parents=True)
    for number in range(count):
        (root / f"photo_{number}.png").write_bytes(encoded(number, "PNG"))


def tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


# ----------------------------------------------------------------------------------------------
# Writing unlabelled shards


def test_images_walks_a_tree_without_classes(tmp_path, caplog):
    root, outside = tmp_path / "photos", tmp_path / "elsewhere"
    (root / "trip" / "day2").mkdir(parents=True)
    outside.mkdir()
    (root / "a.png").write_bytes(encoded(0, "PNG"))
    (root / "b.JPG").write_bytes(encoded(1, "JPEG"))
    (root / "trip" / "c.webp").write_bytes(encoded(2, "WEBP"))
    (root / "trip" / "day2" / "d.bmp").write_bytes(encoded(3, "BMP"))
    (outside / "e.png").write_bytes(encoded(4, "PNG"))
    (root / "trip" / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    (root / "cut.jpg").write_bytes(truncated_jpeg(5))
    (root / ".hidden.png").write_bytes(encoded(6, "PNG"))
    os.symlink(root, root / "trip" / "loop")  # leads back into the walk: taken once
    os.symlink(root / "a.png", root / "same_as_a.png")  # the same file again: taken once
    os.symlink(outside, root / "outside")  # a linked folder elsewhere: followed

    with caplog.at_level(logging.WARNING):
        index = write_images(root, tmp_path / "out", max_count=2, progress=False)
    assert index["num_samples"] == 5 and index["skipped"] == 3
    assert index["class_names"] is None
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "skipped 3 files" in warnings[0]
    members = {}
    for shard in expand_shards(str(tmp_path / "out")):
        members |= tar_members(shard)
    keys = {name.rsplit(".", 1)[0] for name in members}
    assert keys == {"a", "b", "trip/c", "trip/day2/d", "outside/e"}
    assert not [name for name in members if name.endswith(".cls")]  # no labels
    assert members["a.png"] == (root / "a.png").read_bytes()  # PNG and JPEG bytes kept
    assert members["b.jpg"] == (root / "b.JPG").read_bytes()

    # Deterministic: the same call writes the same bytes; --max-images keeps the first N.
    write_images(root, tmp_path / "again", max_count=2, progress=False)
    for name in ("train-000000.tar", "train-000002.tar"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    few = write_images(root, tmp_path / "few", max_images=2, progress=False)
    assert few["num_samples"] == 2
    batch = next(iter(eval_loader(tmp_path / "few", eval_transform(16), 8, 0, 1, 0)))
    assert batch["image"].shape == (2, 3, 16, 16) and "label" not in batch


def test_imagelist_reads_paths_one_a_line(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "x.png").write_bytes(encoded(0, "PNG"))
    (tmp_path / "b" / "deep" / "y.jpg").write_bytes(encoded(1, "JPEG"))
    (tmp_path / "b" / "readme.md").write_text("hi")
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"# my picks\na/x.png\n\n{tmp_path / 'b' / 'deep' / 'y.jpg'}\na/x.png\nb/readme.md\n"
    )
    index = write_image_list(listing, tmp_path / "out", progress=False)
    assert index["num_samples"] == 2 and index["skipped"] == 1  # duplicates once; not an image
    names = tar_members(tmp_path / "out" / "train-000000.tar")
    assert set(names) == {"a/x.png", "b/deep/y.jpg"}  # keys relative to the files' common folder

    listing.write_text("a/x.png\nb/missing.png\n")
    with pytest.raises(DataError, match=r"list.txt line 2: no such file: b/missing.png"):
        write_image_list(listing, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("words")
    (tmp_path / "texts" / "b.csv").write_text("1,2")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "only.jpg").write_bytes(truncated_jpeg(0))
    (tmp_path / "list.txt").write_text("texts/a.txt\nnowhere/photo.jpg\n")
    cases = {
        "empty": (["images", str(tmp_path / "empty")], "no images in"),
        "texts": (["images", str(tmp_path / "texts")], "found 2 files that are not images"),
        "cut": (["images", str(tmp_path / "cut")], "failed to decode (first: "),
        "list": (["imagelist", str(tmp_path / "list.txt")], "line 2: no such file"),
        "flat": (["imagefolder", str(tmp_path / "cut")], "pretrain shards images"),
    }
    for name, (command, fragment) in cases.items():
        out = tmp_path / f"out-{name}"
        assert shards_main([*command, str(out)]) == 2, name
        err = capsys.readouterr().err
        seen = err.rsplit("\r", 1)[-1]  # a progress bar that had started is erased by "\r"
        assert err.count("\n") == 1 and seen.startswith("error: ") and fragment in seen, err
        assert not out.exists(), name

    # A truncated image among good ones is skipped with one warning; the rest is written.
    plain_folder(tmp_path / "mixed", 3)
    (tmp_path / "mixed" / "cut.jpg").write_bytes(truncated_jpeg(1))
    assert shards_main(["images", str(tmp_path / "mixed"), str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "wrote 3 samples in 1 shards" in captured.out and "(skipped 1)" in captured.out


def test_a_skipped_sample_is_named_by_its_shard_and_key(tmp_path, caplog):
    samples = [
        {"__key__": "good", "png": encoded(0, "PNG")},
        {"__key__": "holiday/beach_07", "jpg": b"<html>a web page saved as .jpg</html>"},
        {"__key__": "holiday/cut_08", "jpg": truncated_jpeg(1)},
    ]
    write_shards(samples, tmp_path, progress=False)
    with caplog.at_level(logging.WARNING, logger="pretrain.data.samples"):
        keys = [k for b in eval_loader(tmp_path, eval_transform(8), 4, 0, 1, 0) for k in b["key"]]
    assert keys == ["good"]
    messages = [record.getMessage() for record in caplog.records]
    shard = str(tmp_path / "train-000000.tar")
    assert messages[0] == (
        f"skipped unreadable data: {shard}: sample holiday/beach_07: jpg image: not an image "
        "format Pillow reads"
    )
    assert messages[1].startswith(
        f"skipped unreadable data: {shard}: sample holiday/cut_08: jpg image: image file is "
        "truncated"
    )
    assert len(messages) == 2
    assert not any("BytesIO" in message for message in messages)


# ----------------------------------------------------------------------------------------------
# Pretraining on unlabelled shards; probes need labels


@pytest.fixture
def unlabelled_run(tmp_path_factory, tmp_path):
    folder = tmp_path_factory.mktemp("plain")
    plain_folder(folder / "images", 40)
    write_images(folder / "images", folder / "shards", max_count=16, progress=False)
    return [
        f"data.train_shards={folder / 'shards'}", "data.batch_size=8", "data.num_workers=0",
        "data.shuffle_buffer=16", "data.steps_per_epoch=2", "train.steps=2",
        "train.checkpoint_every=2", "schedule.warmup_steps=1", "logging.log_every=1",
        "logging.image_every=0", "logging.wandb=false", f"train.output_dir={tmp_path / 'runs'}",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "objective, model",
    [
        ("mae", ["model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "mae.decoder_dim=16",
                 "mae.decoder_depth=1"]),
        ("simclr", ["model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}"]),
        ("autoencoder", DCGAN),
        ("vae", DCGAN),
        ("gan", DCGAN),
    ],
)  # fmt: skip
def test_every_objective_without_labels_trains_on_unlabelled_shards(
    unlabelled_run, capsys, objective, model
):
    args = [*unlabelled_run, f"objective.name={objective}", *model, *TINY_GENERATIVE]
    assert pretrain_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["skipped_samples"] == 0


def test_clip_and_probes_say_in_one_line_that_they_need_more_than_images(
    unlabelled_run, tmp_path, capsys
):
    code = pretrain_main([*unlabelled_run, *TINY_CLIP, "model.kwargs={depth: 1}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "objective clip needs txt in every sample" in err[0]
    assert not (tmp_path / "runs").exists()

    mae = ["model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}", "train.run_name=mae"]
    assert pretrain_main([*unlabelled_run, *mae, "mae.decoder_dim=16"]) == 0
    capsys.readouterr()
    shards = unlabelled_run[0].split("=", 1)[1]
    probe = ["--encoder", str(tmp_path / "runs" / "mae"), "--train", shards, "--val", shards]
    for mode in ("linear", "knn", "full"):
        assert finetune_main([mode, *probe, "--no-wandb"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"finetune {mode} needs labelled data" in err[0], err


# ----------------------------------------------------------------------------------------------
# Shards written by img2dataset (and the LAION / DataComp releases)


def img2dataset_shards(folder, shards: int, per_shard: int) -> None:
    """The layout img2dataset writes, built with plain tarfile: NNNNN.tar holding key.jpg,
    key.txt and key.json (its metadata), with NNNNN.parquet and NNNNN_stats.json beside."""
    folder.mkdir()
    words = ["red", "green", "blue", "dark", "bright", "noisy"]
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for position in range(per_shard):
                key = f"{shard:05d}{position:04d}"
                caption = f"a {words[position % 6]} picture number {position}"
                metadata = {"url": f"https://example.com/{key}.jpg", "caption": caption,
                            "key": key, "status": "success", "width": 32, "height": 32}  # fmt: skip
                for name, data in (
                    (f"{key}.jpg", encoded(shard * 100 + position, "JPEG")),
                    (f"{key}.txt", caption.encode()),
                    (f"{key}.json", json.dumps(metadata).encode()),
                ):
                    member = tarfile.TarInfo(name)
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
        # pyarrow is not installed here: the parquet beside the tar is a stand-in with the
        # format's magic bytes; nothing in the toolkit opens it.
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
        stats = {"count": per_shard, "successes": per_shard, "failed_to_download": 0}
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))


def test_img2dataset_layout_trains_clip_and_mae_as_it_is(tmp_path, capsys):
    img2dataset_shards(tmp_path / "laion", shards=3, per_shard=12)
    assert expand_shards(str(tmp_path / "laion")) == [
        str(tmp_path / "laion" / f"{shard:05d}.tar") for shard in range(3)
    ]
    common = [
        f"data.train_shards={tmp_path / 'laion'}", "data.batch_size=8", "data.num_workers=1",
        "data.shuffle_buffer=16", "data.steps_per_epoch=3", "train.steps=3",
        "train.checkpoint_every=3", "logging.log_every=1", "logging.wandb=false",
        "logging.image_every=0", f"train.output_dir={tmp_path / 'runs'}",
        "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    ]  # fmt: skip
    for objective in (TINY_CLIP, ["objective.name=mae", "mae.decoder_dim=16"]):
        assert pretrain_main([*common, *objective]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["steps"] == 3 and summary["skipped_samples"] == 0
        assert summary["final_loss"] > 0
    batch = next(iter(eval_loader(tmp_path / "laion", lambda sample: sample, 4, 0, 1, 0)))
    assert batch["captions"][0] == ["a red picture number 0"]  # the img2dataset json is ignored
