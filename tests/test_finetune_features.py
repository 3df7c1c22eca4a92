"""Feature extraction: every sample exactly once over real processes, rows lined up with labels,
the same order and subset on any process count, and a cache that hits only on the same inputs."""

import io
import json
import subprocess

import pytest
import torch
import webdataset as wds
from helpers import PYTHON, WORKERS, free_port, python_env
from PIL import Image

from finetune.features import (
    SampleTransform,
    cached_features,
    extract_features,
    shard_fingerprint,
    shards_covering,
)
from pretrain.data import expand_shards
from pretrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from pretrain.distributed import make_accelerator

SHARD_SIZES = [7, 3, 11, 5, 2]  # uneven: rank 0 reads shards 0, 2, 4 (20), rank 1 1, 3 (8)
TOTAL = sum(SHARD_SIZES)


def label_of(number: int) -> int:
    return (number * 3) % 4


def key_of(number: int) -> str:
    return f"k{(number * 5) % TOTAL:03d}"  # sorted keys are not in shard order


def write_label_coded_shards(folder):
    """Sample `number` is a flat colour: red = 30 + 50 * label, green = 10 + 4 * number, so
    a feature row that is the mean colour says which sample and which label it came from."""
    folder.mkdir(parents=True, exist_ok=True)
    number, listed = 0, []
    for shard, size in enumerate(SHARD_SIZES):
        name = f"train-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as writer:
            for _ in range(size):
                colour = (30 + 50 * label_of(number), 10 + 4 * number, 200)
                buffer = io.BytesIO()
                Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
                writer.write(
                    {"__key__": key_of(number), "png": buffer.getvalue(), "cls": label_of(number)}
                )
                number += 1
        listed.append({"name": name, "count": size})
    index = {"shards": listed, "num_samples": TOTAL, "class_names": list("abcd")}
    (folder / "train-index.json").write_text(json.dumps(index))


def decode_colour(features: torch.Tensor) -> torch.Tensor:
    """Mean normalised colour [N, 3] -> 0..255 pixel values [N, 3]."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return ((features * std + mean) * 255).round().long()


def check_aligned(features: torch.Tensor, labels: torch.Tensor, keys: list[str]) -> None:
    pixels = decode_colour(features)
    numbers = (pixels[:, 1] - 10) // 4
    assert keys == sorted(keys)
    assert [key_of(int(number)) for number in numbers] == keys  # row i is sample keys[i]
    assert labels.tolist() == [label_of(int(number)) for number in numbers]
    assert ((pixels[:, 0] - 30) // 50).tolist() == labels.tolist()


@pytest.mark.distributed
def test_two_processes_extract_each_sample_once_lined_up_with_labels(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    write_label_coded_shards(shards)
    out.mkdir()
    command = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()),
        str(WORKERS / "finetune_extract_worker.py"), str(shards), str(out),
    ]  # fmt: skip
    result = subprocess.run(
        command, env=python_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [rank["world"] for rank in ranks] == [2, 2]
    # Each process encoded only its own shards, and together every sample exactly once.
    assert [rank["encoded_here"] for rank in ranks] == [20, 8]
    all_keys = sorted(key_of(number) for number in range(TOTAL))
    for rank in ranks:
        gathered = rank["features"]
        assert gathered["keys"] == all_keys  # no sample missing, none twice
        check_aligned(gathered["features"], gathered["labels"], gathered["keys"])
        assert rank["cached"] == [False, True] and rank["second_keys"] == all_keys
    torch.testing.assert_close(ranks[0]["features"]["features"], ranks[1]["features"]["features"])

    # The seeded subset is the same as one process draws.
    accelerator = make_accelerator("no", None)
    alone = extract_features(
        lambda images: images.mean(dim=(2, 3)),
        expand_shards(str(shards / "train-index.json")),
        SampleTransform(eval_transform(8).image_transform),
        accelerator,
        batch_size=4,
        num_workers=0,
        max_samples=9,
        seed=5,
    )
    assert len(alone) == 9
    for rank in ranks:
        assert rank["subset"]["keys"] == alone.keys
        check_aligned(rank["subset"]["features"], rank["subset"]["labels"], alone.keys)


def test_subset_reads_only_the_shards_it_needs_and_the_cache_key_sees_rewrites(tmp_path):
    shards = tmp_path / "shards"
    write_label_coded_shards(shards)
    urls = expand_shards(str(shards / "train-index.json"))
    assert shards_covering(urls, 9) == urls[:2]  # 7 + 3 samples
    assert shards_covering(urls, 10) == urls[:2] and shards_covering(urls, 11) == urls[:3]
    assert shards_covering(urls, 0) == urls and shards_covering(urls, 1000) == urls

    accelerator = make_accelerator("no", None)
    calls = []

    def extract():
        calls.append(1)
        return extract_features(
            lambda images: images.mean(dim=(2, 3)),
            urls,
            SampleTransform(eval_transform(8).image_transform),
            accelerator,
            batch_size=4,
            num_workers=0,
        )

    identity = {"shards": shard_fingerprint(urls)}
    first, hit = cached_features(tmp_path / "cache", identity, accelerator, extract)
    assert not hit and len(first) == TOTAL
    check_aligned(first.features, first.labels, first.keys)
    again, hit = cached_features(tmp_path / "cache", identity, accelerator, extract)
    assert hit and len(calls) == 1 and again.keys == first.keys
    torch.testing.assert_close(again.features, first.features)
    # Rewriting a shard changes its size/mtime and so the key: the cache misses.
    (shards / "train-000004.tar").write_bytes((shards / "train-000004.tar").read_bytes())
    rewritten = {"shards": shard_fingerprint(urls)}
    _, hit = cached_features(tmp_path / "cache", rewritten, accelerator, extract)
    assert not hit and len(calls) == 2
