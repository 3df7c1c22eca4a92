"""Several captions per image: the writer stores an image once with all its captions, CLIP draws
one per image per step (seeded), and retrieval is scored the standard way."""

import json
import tarfile

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finetune.__main__ import main as finetune_main
from finetune.zeroshot import caption_groups, flatten_captions, retrieval_recall
from pretrain.__main__ import main as pretrain_main
from pretrain.data import DataError, eval_loader, train_loader, write_captions, write_shards
from pretrain.data.transforms import ImageText, eval_transform


def caption_list(folder, rows: list[tuple[str, str, str]], name="list.csv"):
    """rows: (image file name, caption, label); the images are drawn in distinct colours."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for image in {row[0] for row in rows}:
        colour = (hash(image) % 200 + 30, 60, 90)
        Image.new("RGB", (16, 16), colour).save(folder / "images" / image)
    lines = ["image,caption,label"] + [
        f"images/{image},{text},{label}" for image, text, label in rows
    ]
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def keep_captions(sample: dict) -> dict:
    return {"captions": sample["captions"], "caption": sample["caption"]}


def read_captions(shards) -> dict[str, list[str]]:
    found = {}
    for batch in eval_loader(shards, keep_captions, 8, 0, 1, 0):
        found |= dict(zip(batch["key"], batch["captions"]))
    return found


def test_rows_of_one_image_become_one_sample_with_all_its_captions(tmp_path):
    rows = [
        ("a.png", "a cat on a mat", "cat"),
        ("b.png", "a dog in a park", "dog"),
        ("a.png", "the mat has a cat", "cat"),
        ("c.png", "a bird", "bird"),
        ("b.png", "park with a dog", "dog"),
        ("a.png", "feline resting", "cat"),
    ]
    listing = caption_list(tmp_path, rows)
    index = write_captions(listing, tmp_path / "out", progress=False)
    assert index["num_samples"] == 3 and index["num_captions"] == 6
    assert read_captions(tmp_path / "out") == {  # keys: the first row of each image
        "00000000": ["a cat on a mat", "the mat has a cat", "feline resting"],
        "00000001": ["a dog in a park", "park with a dog"],
        "00000003": ["a bird"],
    }
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        names = set(tar.getnames())
    # txt keeps the first caption (what single-caption readers see); json only when several
    assert {"00000000.txt", "00000000.json", "00000003.txt"} <= names
    assert "00000003.json" not in names

    # The same file spelt another way is the same image; its rows must agree on the label.
    absolute = str(tmp_path / "images" / "c.png")
    (tmp_path / "more.csv").write_text(
        f"image,caption,label\nimages/c.png,one,bird\n{absolute},two,bird\nimages/a.png,x,dog\n"
    )
    assert (
        write_captions(tmp_path / "more.csv", tmp_path / "more", progress=False)["num_samples"] == 2
    )
    (tmp_path / "bad.csv").write_text("image,caption,label\nimages/c.png,one,bird\n"
                                      "images/c.png,two,cat\n")  # fmt: skip
    with pytest.raises(DataError, match="rows of image images/c.png give it different labels"):
        write_captions(tmp_path / "bad.csv", tmp_path / "bad", progress=False)


def test_older_one_caption_shards_still_read(tmp_path):
    samples = [
        {"__key__": "00000000", "png": open_png(tmp_path), "txt": "a caption of old"},
    ]
    write_shards(samples, tmp_path / "old", progress=False)
    assert read_captions(tmp_path / "old") == {"00000000": ["a caption of old"]}


def open_png(folder) -> bytes:
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "x.png")
    return (folder / "x.png").read_bytes()


def caption_ids(captions: list[str]) -> torch.Tensor:
    """A stand-in tokenizer: caption -> its number in the fixture (one id per caption)."""
    return torch.tensor([[int(text.split()[-1])] for text in captions])


def drawn_captions(shards, seed=0, start_step=0, epoch=0):
    transform = ImageText(eval_transform(8).image_transform, caption_ids)
    loader = train_loader(
        shards, transform, batch_size=4, steps_per_epoch=12, epoch=epoch, seed=seed, rank=0,
        world_size=1, num_workers=1, shuffle_buffer=8, start_step=start_step,
    )  # fmt: skip
    return [(key, int(text)) for batch in loader for key, text in zip(batch["key"], batch["text"])]


def test_clip_draws_one_caption_per_image_per_step_seeded(tmp_path):
    rows = [(f"{image}.png", f"caption {image * 10 + n}", "x") for image in range(4) for n in
            range(5)]  # fmt: skip
    write_captions(caption_list(tmp_path, rows), tmp_path / "out", progress=False)
    draws = drawn_captions(tmp_path / "out")
    assert len(draws) == 48
    for key, caption in draws:  # always one of that image's own captions
        assert caption // 10 == int(key) // 5
    per_image = {}
    for key, caption in draws:
        per_image.setdefault(key, set()).add(caption)
    assert len(per_image) == 4 and all(len(drawn) > 1 for drawn in per_image.values())
    assert drawn_captions(tmp_path / "out") == draws  # seeded
    assert drawn_captions(tmp_path / "out", start_step=5) == draws[20:]  # resume: the same tail
    assert drawn_captions(tmp_path / "out", epoch=1) != draws


# ----------------------------------------------------------------------------------------------
# Retrieval, the standard way


def naive_recall(images, texts, owner, k):
    """Image i is a hit if one of its captions is among its k nearest; caption t if its image is
    among its k nearest (captions with unique strings)."""
    similarity = F.normalize(images, dim=1) @ F.normalize(texts, dim=1).T
    image_hits = sum(
        any(owner[t] == i for t in similarity[i].topk(k).indices.tolist())
        for i in range(len(images))
    )
    text_hits = sum(
        owner[t] in similarity[:, t].topk(k).indices.tolist() for t in range(len(texts))
    )
    return image_hits / len(images), text_hits / len(texts)


def test_retrieval_recall_by_construction_and_against_a_naive_reference():
    # 5 images, 5 captions each: captions 0-2 sit next to their own image, captions 3-4 next
    # to the following image. By construction: every image's nearest caption is one of its own
    # (image->text R@1 = 1), and 3 of each image's 5 captions find it first (text->image 0.6).
    # Scored per caption sample with image copies, as before, R@1 could not exceed 1/5.
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5, 64, generator=generator), dim=1)
    texts, owner = [], []
    for image in range(5):
        for caption in range(5):
            near = image if caption < 3 else (image + 1) % 5
            noise = 0.01 if caption < 3 else 0.1
            texts.append(images[near] + noise * torch.randn(64, generator=generator))
            owner.append(image)
    texts, owner = torch.stack(texts), torch.tensor(owner)
    recall = retrieval_recall(images, texts, ks=(1, 5), text_image=owner)
    assert recall == {
        "image_to_text_r1": 1.0, "text_to_image_r1": 0.6,
        "image_to_text_r5": 1.0, "text_to_image_r5": 1.0,
    }  # fmt: skip

    random_images = torch.randn(12, 16, generator=generator)
    random_owner = torch.randint(0, 12, (40,), generator=generator)
    random_owner[:12] = torch.arange(12)  # every image has a caption
    random_texts = random_images[random_owner] + 0.8 * torch.randn(40, 16, generator=generator)
    for k in (1, 3):
        got = retrieval_recall(random_images, random_texts, ks=(k,), text_image=random_owner)
        expected = naive_recall(random_images, random_texts, random_owner.tolist(), k)
        assert (got[f"image_to_text_r{k}"], got[f"text_to_image_r{k}"]) == pytest.approx(expected)


def test_a_caption_string_shared_by_images_belongs_to_each_of_them():
    red, blue = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    images = torch.stack([red + torch.tensor([0, 0.01]), red - torch.tensor([0, 0.01]), blue])
    captions = [["a red one", "crimson"], ["a red one"], ["blue"]]
    texts_list, owner = flatten_captions(captions)
    assert texts_list == ["a red one", "crimson", "a red one", "blue"]
    assert owner.tolist() == [0, 0, 1, 2]
    texts = torch.stack([red, red + torch.tensor([0, 0.02]), red, blue])
    recall = retrieval_recall(
        images, texts, ks=(1,), text_groups=caption_groups(texts_list), text_image=owner
    )
    assert recall == {"image_to_text_r1": 1.0, "text_to_image_r1": 1.0}


def test_zeroshot_scores_unique_images_of_grouped_caption_shards(tiny_run, tmp_path, capsys):
    rows = [(f"{image}.png", f"picture {image} seen {n}", str(image % 3)) for image in range(8)
            for n in range(3)]  # fmt: skip
    write_captions(caption_list(tmp_path, rows), tmp_path / "caps", progress=False)
    clip = [
        "objective.name=clip", "clip.embed_dim=16", "clip.context_length=24",
        "clip.text_width=32", "clip.text_layers=1", "clip.text_heads=2", "train.steps=2",
        "train.run_name=clip", f"data.train_shards={tmp_path / 'caps'}", "data.image_size=16",
        "model.patch_size=8", "data.batch_size=4",
    ]  # fmt: skip
    assert pretrain_main([*tiny_run, *clip]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "clip"
    args = ["zeroshot", "--encoder", str(run_dir), "--val", str(tmp_path / "caps"), "--no-wandb"]
    assert finetune_main([*args, "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_samples"] == 8 and result["val_captions"] == 24
    for direction in ("image_to_text", "text_to_image"):
        assert 0 <= result[f"{direction}_r1"] <= result[f"{direction}_r5"] <= 1
