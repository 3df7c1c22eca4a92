"""The data layer: shard writing, exact and resampled reading, skip counting, demo set, CLI.

Every test builds its own tiny shards in tmp_path.
"""

import io
import json
import logging
import os
import tarfile

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from pretrain.data import (
    DataError,
    collate,
    count_samples,
    ensure_demo_data,
    eval_loader,
    eval_transform,
    expand_shards,
    mae_train_transform,
    train_loader,
    write_captions,
    write_demo,
    write_imagefolder,
    write_shards,
)
from pretrain.data.cli import main
from pretrain.data.demo import COLOURS, SHAPES

# ----------------------------------------------------------------------------------------------
# Fixtures: tiny image files and shards


def image_bytes(value: int, file_format: str = "PNG", size: int = 8) -> bytes:
    colour = (value * 37 % 256, value * 91 % 256, value * 13 % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format=file_format)
    return buffer.getvalue()


def make_imagefolder(root, counts: dict[str, int]) -> dict[str, str]:
    """root/<class>/<name>.(jpg|png) with alternating formats; returns {expected key: class}."""
    expected = {}
    for class_name, count in counts.items():
        (root / class_name).mkdir(parents=True)
        for number in range(count):
            extension, file_format = ("jpg", "JPEG") if number % 2 else ("png", "PNG")
            path = root / class_name / f"img.{number}.{extension}"
            path.write_bytes(image_bytes(number, file_format))
            expected[f"{class_name}/img_{number}"] = class_name
    return expected


def write_uneven_shards(folder, counts: list[int]) -> tuple[list[str], set[str]]:
    """One shard per entry of `counts` (that many samples); returns (shard paths, all keys)."""
    urls, keys = [], set()
    for shard, count in enumerate(counts):
        samples = [
            {"__key__": f"s{shard}-{n}", "png": image_bytes(shard * 10 + n), "cls": n % 3}
            for n in range(count)
        ]
        write_shards(samples, folder, prefix=f"part{shard}", progress=False)
        urls.append(str(folder / f"part{shard}-000000.tar"))
        keys |= {sample["__key__"] for sample in samples}
    return urls, keys


def keep_caption(sample: dict) -> dict:
    return {
        "image": to_tensor(sample["image"]),
        "label": sample.get("label", -1),
        "caption": sample["caption"],
    }


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch["key"]]


# ----------------------------------------------------------------------------------------------
# Writing


def test_imagefolder_round_trip(tmp_path):
    expected = make_imagefolder(tmp_path / "src", {"cat": 3, "dog": 2, "fish": 4})
    index = write_imagefolder(tmp_path / "src", tmp_path / "out", max_count=4, progress=False)

    assert index["class_names"] == ["cat", "dog", "fish"]
    assert index["num_samples"] == 9 and index["skipped"] == 0
    assert [shard["count"] for shard in index["shards"]] == [4, 4, 1]
    assert index["pattern"] == "train-{000000..000002}.tar"
    on_disk = json.loads((tmp_path / "out" / "train-index.json").read_text())
    assert on_disk == {key: value for key, value in index.items() if key != "skipped"}

    loader = eval_loader(
        tmp_path / "out", eval_transform(8), batch_size=4, rank=0, world_size=1, num_workers=0
    )
    labels = {}
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 8, 8) and batch["label"].dtype == torch.int64
        labels |= dict(zip(batch["key"], batch["label"].tolist()))
    assert set(labels) == set(expected)
    assert all(index["class_names"][labels[key]] == expected[key] for key in expected)
    assert count_samples(expand_shards(str(tmp_path / "out"))) == 9


def test_imagefolder_keeps_source_bytes(tmp_path):
    make_imagefolder(tmp_path / "src", {"a": 2})
    write_imagefolder(tmp_path / "src", tmp_path / "out", progress=False)
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        stored = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
    assert stored["a/img_0.png"] == (tmp_path / "src" / "a" / "img.0.png").read_bytes()
    assert stored["a/img_1.jpg"] == (tmp_path / "src" / "a" / "img.1.jpg").read_bytes()
    assert stored["a/img_0.cls"] == b"0"


def test_imagefolder_skips_non_images_with_one_warning(tmp_path, caplog):
    make_imagefolder(tmp_path / "src", {"a": 2, "b": 2})
    (tmp_path / "src" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "src" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    with caplog.at_level(logging.WARNING, logger="pretrain.data.sources"):
        index = write_imagefolder(tmp_path / "src", tmp_path / "out", progress=False)
    assert index["num_samples"] == 4 and index["skipped"] == 2
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 files" in warnings[0].getMessage()


def test_imagefolder_input_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found: .*missing"):
        write_imagefolder(tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(image_bytes(1))
    with pytest.raises(DataError, match="no class folders"):
        write_imagefolder(tmp_path / "flat", tmp_path / "out", progress=False)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        write_imagefolder(tmp_path / "empty", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "train-index.json").exists()


def test_existing_shards_need_overwrite_and_are_replaced(tmp_path):
    make_imagefolder(tmp_path / "src", {"a": 3})
    write_imagefolder(tmp_path / "src", tmp_path / "out", max_count=1, progress=False)
    with pytest.raises(DataError, match="already holds 'train' shards"):
        write_imagefolder(tmp_path / "src", tmp_path / "out", progress=False)
    write_imagefolder(tmp_path / "src", tmp_path / "out", overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["train-000000.tar", "train-index.json"]


def test_failed_write_leaves_no_index_and_no_shards(tmp_path):
    def samples():
        yield {"__key__": "a", "png": image_bytes(1)}
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(samples(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # the folder it made goes too
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(samples(), tmp_path / "mine", progress=False)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_captions_csv_and_json_round_trip(tmp_path):
    (tmp_path / "images").mkdir()
    for number in range(3):
        (tmp_path / "images" / f"{number}.png").write_bytes(image_bytes(number))
    (tmp_path / "list.csv").write_text(
        "image,caption,label\n"
        "images/0.png,a red thing,cat\n"
        'images/1.png,"a blue thing, small",dog\n'
        "images/missing.png,lost,cat\n"
        f"{tmp_path / 'images' / '2.png'},an absolute path,dog\n"
    )
    index = write_captions(tmp_path / "list.csv", tmp_path / "csv", progress=False)
    assert index["num_samples"] == 3 and index["skipped"] == 1
    assert index["class_names"] == ["cat", "dog"]
    batches = list(eval_loader(tmp_path / "csv", keep_caption, 8, 0, 1, 0))
    by_key = {}
    for batch in batches:
        by_key |= dict(zip(batch["key"], zip(batch["caption"], batch["label"].tolist())))
    assert by_key == {
        "00000000": ("a red thing", 0),
        "00000001": ("a blue thing, small", 1),
        "00000003": ("an absolute path", 1),
    }

    rows = [{"path": "images/0.png", "text": "first"}, {"path": "images/2.png", "text": "third"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    index = write_captions(tmp_path / "list.json", tmp_path / "json", progress=False)
    assert index["num_samples"] == 2 and index["class_names"] is None
    batch = next(iter(eval_loader(tmp_path / "json", keep_caption, 8, 0, 1, 0)))
    assert dict(zip(batch["key"], batch["caption"])) == {"00000000": "first", "00000001": "third"}


def test_captions_need_image_and_caption_columns(tmp_path):
    (tmp_path / "list.csv").write_text("file,words\na.png,hello\n")
    with pytest.raises(DataError, match="needs an 'image'.*found: file, words"):
        write_captions(tmp_path / "list.csv", tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------------------------
# Shard specs


def test_expand_shards_forms(tmp_path):
    urls, _ = write_uneven_shards(tmp_path, [1, 1, 1])
    assert expand_shards(str(tmp_path / "part{0..2}-000000.tar")) == urls
    assert expand_shards(f"{urls[2]},{urls[0]}") == [urls[2], urls[0]]
    assert expand_shards(str(tmp_path / "part{0,1}-000000.tar") + f",{urls[2]}") == urls
    assert expand_shards(str(tmp_path / "part1-index.json")) == [urls[1]]
    assert expand_shards(str(tmp_path / "*.tar")) == urls
    assert expand_shards("https://example.com/a-{0..1}.tar") == [
        "https://example.com/a-0.tar",
        "https://example.com/a-1.tar",
    ]
    assert expand_shards("pipe:cat a.tar", allow_pipe=True) == ["pipe:cat a.tar"]
    with pytest.raises(DataError, match="several shard sets"):
        expand_shards(str(tmp_path))


def test_expand_shards_errors(tmp_path):
    urls, _ = write_uneven_shards(tmp_path, [1])
    with pytest.raises(DataError, match=f"shard not found: {tmp_path}/nope.tar"):
        expand_shards(str(tmp_path / "nope.tar"))
    with pytest.raises(DataError, match=r"shard not found: .*part1-000000.tar \(and 1 more\)"):
        expand_shards(str(tmp_path / "part{0..2}-000000.tar"))
    with pytest.raises(DataError, match="no shards match .*nothing-"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(DataError, match="shard spec is empty"):
        expand_shards(" , ")
    with pytest.raises(DataError, match="data.allow_pipe"):
        expand_shards(f"{urls[0]},pipe:cat x.tar")
    with pytest.raises(DataError, match="shard not found"):
        train_loader(str(tmp_path / "gone.tar"), keep_caption, 2, 1, 0, 0, 0, 1, 0)
    with pytest.raises(DataError, match="data.allow_pipe"):
        eval_loader(["pipe:cat x.tar"], keep_caption, 2, 0, 1, 0)


# ----------------------------------------------------------------------------------------------
# Evaluation loader: exact


@pytest.mark.parametrize("counts", [[5, 1, 3, 4, 2], [3, 4, 2]])
def test_eval_each_sample_once_over_ranks_and_workers(tmp_path, counts):
    urls, all_keys = write_uneven_shards(tmp_path, counts)
    seen = []
    for rank in range(2):
        loader = eval_loader(
            urls, eval_transform(8), batch_size=2, rank=rank, world_size=2, num_workers=2
        )
        seen += keys_of(loader)
        assert loader.skipped == 0
    assert len(seen) == len(all_keys) and set(seen) == all_keys


def test_eval_rank_without_shards_yields_nothing(tmp_path):
    urls, all_keys = write_uneven_shards(tmp_path, [2, 3, 1])
    per_rank = [keys_of(eval_loader(urls, eval_transform(8), 4, rank, 4, 2)) for rank in range(4)]
    assert per_rank[3] == []
    assert sorted(key for keys in per_rank for key in keys) == sorted(all_keys)


# ----------------------------------------------------------------------------------------------
# Training loader: resampled, seeded, equal steps


def train_batches(urls, rank=0, seed=0, epoch=0, start_step=0, num_workers=2, steps=7):
    loader = train_loader(
        urls,
        mae_train_transform(8),
        batch_size=3,
        steps_per_epoch=steps,
        epoch=epoch,
        seed=seed,
        rank=rank,
        world_size=2,
        num_workers=num_workers,
        shuffle_buffer=10,
        start_step=start_step,
    )
    assert len(loader) == steps - start_step
    return list(loader)


def test_train_every_rank_takes_the_same_steps(tmp_path):
    urls, all_keys = write_uneven_shards(tmp_path, [5, 1, 3, 4, 2])
    for rank in range(2):
        batches = train_batches(urls, rank=rank)
        assert len(batches) == 7
        assert all(batch["image"].shape == (3, 3, 8, 8) for batch in batches)
        assert all(set(batch) == {"image", "label", "key"} for batch in batches)
        assert {key for batch in batches for key in batch["key"]} <= all_keys


def test_train_order_is_a_function_of_seed_and_epoch(tmp_path):
    urls, _ = write_uneven_shards(tmp_path, [5, 1, 3, 4, 2])
    first, again = train_batches(urls), train_batches(urls)
    assert [b["key"] for b in first] == [b["key"] for b in again]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    for other in (
        train_batches(urls, seed=1),
        train_batches(urls, epoch=1),
        train_batches(urls, rank=1),
    ):
        assert [b["key"] for b in other] != [b["key"] for b in first]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_train_resume_gives_the_tail_of_the_epoch(tmp_path, num_workers):
    urls, _ = write_uneven_shards(tmp_path, [5, 1, 3, 4, 2])
    full = train_batches(urls, num_workers=num_workers)
    for start_step in (1, 4):
        resumed = train_batches(urls, num_workers=num_workers, start_step=start_step)
        assert [b["key"] for b in resumed] == [b["key"] for b in full[start_step:]]
        # identical crops and flips, although the skipped samples were never transformed
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[start_step:]))


def test_train_keeps_the_callers_rng_state_without_workers(tmp_path):
    urls, _ = write_uneven_shards(tmp_path, [4])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_batches(urls, num_workers=0, steps=2)
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------------------------
# Unreadable data is skipped and counted


def write_broken_shards(folder) -> tuple[list[str], set[str]]:
    """A good shard, a shard with one corrupt JPEG, a truncated shard, a vanished shard."""
    urls, good_keys = write_uneven_shards(folder, [3])
    corrupt = [
        {"__key__": "bad-0", "jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "cls": 0},
        {"__key__": "bad-1", "png": image_bytes(7), "cls": 1},
    ]
    write_shards(corrupt, folder, prefix="corrupt", progress=False)
    whole = [{"__key__": f"cut-{n}", "png": image_bytes(n, size=32), "cls": 2} for n in range(6)]
    write_shards(whole, folder, prefix="cut", progress=False)
    truncated = folder / "cut-000000.tar"
    with tarfile.open(truncated) as tar:
        cut = tar.getmembers()[5].offset_data + 10  # inside the third sample's image
    truncated.write_bytes(truncated.read_bytes()[:cut])
    urls += [str(folder / "corrupt-000000.tar"), str(truncated), str(folder / "vanished.tar")]
    (folder / "vanished.tar").write_bytes(b"")
    return urls, good_keys | {"bad-1"}


def test_corrupt_image_and_truncated_tar_are_skipped_and_counted(tmp_path):
    urls, good_keys = write_broken_shards(tmp_path)
    loaders = [eval_loader(urls, eval_transform(8), 2, 0, 1, num_workers) for num_workers in (0, 2)]
    loaders.append(
        train_loader(urls, mae_train_transform(8), 2, 5, 0, 0, 0, 1, 2, shuffle_buffer=5)
    )
    os.remove(urls[-1])  # missing at read time, after the spec was checked
    for loader in loaders[:2]:
        keys = keys_of(loader)
        assert good_keys <= set(keys) and "bad-0" not in keys
        assert all(key.startswith("cut-") for key in set(keys) - good_keys)  # before the cut
        assert loader.skipped >= 3  # corrupt image, truncated tar, missing shard

    assert len(list(loaders[2])) == 5 and loaders[2].skipped > 0


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_raises_instead_of_spinning_when_nothing_is_readable(tmp_path, num_workers):
    (tmp_path / "junk.tar").write_bytes(os.urandom(2000))
    loader = train_loader(
        str(tmp_path / "junk.tar"), mae_train_transform(8), 2, 1, 0, 0, 0, 1, num_workers
    )
    with pytest.raises(DataError, match="^no readable sample in 110 shard draws") as raised:
        list(loader)
    assert "\n" not in str(raised.value)


# ----------------------------------------------------------------------------------------------
# Collation, demo data, command line


def test_collate_stacks_tensors_ints_and_lists_strings():
    batch = collate(
        [
            {"image": torch.zeros(3, 2, 2), "label": 1, "caption": "a", "__key__": "k"},
            {"image": torch.ones(3, 2, 2), "label": 4, "caption": "b", "__key__": "l"},
        ]
    )
    assert set(batch) == {"image", "label", "caption"}
    assert batch["image"].shape == (2, 3, 2, 2)
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [1, 4]
    assert batch["caption"] == ["a", "b"]


def test_demo_data_labels_captions_and_determinism(tmp_path):
    written = write_demo(tmp_path / "one", num_train=40, num_val=12, seed=3, progress=False)
    assert written["train"]["num_samples"] == 40 and written["val"]["num_samples"] == 12
    assert written["train"]["class_names"] == list(SHAPES)

    batches = list(eval_loader(tmp_path / "one" / "train-index.json", keep_caption, 16, 0, 1, 0))
    assert batches[0]["image"].shape[1:] == (3, 32, 32)
    labels = [label for batch in batches for label in batch["label"].tolist()]
    captions = [caption for batch in batches for caption in batch["caption"]]
    assert len(labels) == 40 and len(set(labels)) > 3
    for label, caption in zip(labels, captions):
        assert SHAPES[label] in caption.split()
        assert any(colour in caption.split() for colour in COLOURS)

    write_demo(tmp_path / "two", num_train=40, num_val=12, seed=3, progress=False)
    write_demo(tmp_path / "other", num_train=40, num_val=12, seed=4, progress=False)
    shard = "train-000000.tar"
    assert (tmp_path / "one" / shard).read_bytes() == (tmp_path / "two" / shard).read_bytes()
    assert (tmp_path / "one" / shard).read_bytes() != (tmp_path / "other" / shard).read_bytes()


def test_ensure_demo_data_writes_once(tmp_path):
    specs = ensure_demo_data(tmp_path, 20, 5, 32, seed=0, progress=False)
    assert len(expand_shards(specs["train"])) == 1 and len(expand_shards(specs["val"])) == 1
    written_at = os.path.getmtime(specs["train"])
    assert ensure_demo_data(tmp_path, 20, 5, 32, seed=0, progress=False) == specs
    assert os.path.getmtime(specs["train"]) == written_at
    assert ensure_demo_data(tmp_path, 20, 5, 32, seed=1, progress=False)["dir"] != specs["dir"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no leftovers
    assert os.stat(specs["dir"]).st_mode & 0o777 == 0o755


def test_cli_reports_one_error_line(tmp_path, capsys):
    assert main(["imagefolder", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: image folder not found")
    assert main(["imagefolder"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_writes_demo_and_imagefolder(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "demo"), "--train", "10", "--val", "4"]) == 0
    assert json.loads((tmp_path / "demo" / "val-index.json").read_text())["num_samples"] == 4
    make_imagefolder(tmp_path / "src", {"a": 2, "b": 1})
    assert (
        main(
            [
                "imagefolder",
                str(tmp_path / "src"),
                str(tmp_path / "out"),
                "--prefix",
                "x",
                "--max-count",
                "2",
            ]
        )
        == 0
    )
    assert "wrote 3 samples in 2 shards" in capsys.readouterr().out
