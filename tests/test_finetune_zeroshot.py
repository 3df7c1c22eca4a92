import json

import pytest
import torch
import torch.nn.functional as F

from finetune.__main__ import main as finetune_main
from finetune.metrics import topk_accuracy
from finetune.zeroshot import (
    caption_groups,
    class_embeddings,
    retrieval_recall,
    zero_shot_scores,
)
from pretrain.__main__ import main as pretrain_main


class BagOfWords:
    """A stand-in text tower: a prompt's embedding is the sum of its words' random vectors."""

    def __init__(self, dim: int = 32):
        self.dim = dim
        self.vocabulary: dict[str, int] = {}
        self.vectors = torch.randn(100, dim, generator=torch.Generator().manual_seed(0))

    def word(self, word: str) -> torch.Tensor:
        return self.vectors[self.vocabulary.setdefault(word, len(self.vocabulary) + 1)]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        ids = [
            [self.vocabulary.setdefault(w, len(self.vocabulary) + 1) for w in t.split()]
            for t in texts
        ]
        length = max(len(row) for row in ids)
        return torch.tensor([row + [0] * (length - len(row)) for row in ids])  # 0: padding

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        embedded = self.vectors[tokens] * (tokens > 0)[..., None]  # [B, T, D]
        return F.normalize(embedded.sum(dim=1), dim=-1)


def test_zero_shot_picks_the_class_whose_name_the_image_shows():
    tower = BagOfWords()
    names, templates = ["cat", "dog", "bird", "fish"], ["a photo of a {}.", "a {} ."]
    embeds = class_embeddings(tower.encode_text, tower.tokenize, names, templates)
    assert embeds.shape == (4, 32)
    torch.testing.assert_close(embeds.norm(dim=1), torch.ones(4))
    # Prompt ensembling: the normalised mean of the normalised template embeddings.
    cat = [tower.encode_text(tower.tokenize([t.format("cat")]))[0] for t in templates]
    torch.testing.assert_close(embeds[0], F.normalize(torch.stack(cat).mean(0), dim=0))

    # Each "image" looks like its class name's word, plus noise.
    labels = torch.arange(40) % 4
    noise = 0.3 * torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    images = torch.stack([tower.word(names[label]) for label in labels]) + noise
    scores = zero_shot_scores(images, embeds)
    assert scores.shape == (40, 4) and scores.abs().max() <= 1 + 1e-5
    assert topk_accuracy(scores, labels, 1) == 1.0
    assert topk_accuracy(scores, labels[torch.randperm(40)], 1) < 0.6


def test_retrieval_recall_counts_matching_pairs_and_shared_captions():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(20, 16, generator=generator)
    texts = images + 0.05 * torch.randn(20, 16, generator=generator)
    perfect = retrieval_recall(images, texts)
    assert perfect == {
        "image_to_text_r1": 1.0, "text_to_image_r1": 1.0,
        "image_to_text_r5": 1.0, "text_to_image_r5": 1.0,
    }  # fmt: skip
    shifted = retrieval_recall(images, texts.roll(1, dims=0), ks=(1,))
    assert shifted["image_to_text_r1"] == 0.0 and shifted["text_to_image_r1"] == 0.0

    # Two images share the caption "red": either of its (identical) embeddings is a hit.
    red, blue = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    pair_images = torch.stack([red + torch.tensor([0, 0.01]), red - torch.tensor([0, 0.01]), blue])
    pair_texts = torch.stack([red, red, blue])
    captions = ["red", "red", "blue"]
    assert caption_groups(captions).tolist() == [0, 0, 1]
    strict = retrieval_recall(pair_images, pair_texts, ks=(1,))
    assert strict["image_to_text_r1"] == pytest.approx(2 / 3)  # the tie goes to one of the two
    grouped = retrieval_recall(
        pair_images, pair_texts, ks=(1,), text_groups=caption_groups(captions)
    )
    assert grouped["image_to_text_r1"] == 1.0 and grouped["text_to_image_r1"] == 1.0


TINY_CLIP = [
    "objective.name=clip",
    "clip.embed_dim=16",
    "clip.context_length=24",
    "clip.text_width=32",
    "clip.text_layers=1",
    "clip.text_heads=2",
]


def test_zeroshot_cli_on_a_tiny_clip_run(tiny_run, tmp_path, capsys):
    assert pretrain_main([*tiny_run, *TINY_CLIP, "train.steps=2", "train.run_name=clip"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "clip"
    common = ["--encoder", str(run_dir), "--workers", "0", "--no-wandb"]
    assert finetune_main(["zeroshot", *common, "--compare-random-init"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["objective"] == "clip" and result["val_samples"] == 64
    assert result["num_classes"] == 6  # the demo shapes, named in the shard index
    for key in ("top1", "top5", "image_to_text_r1", "text_to_image_r5", "random_init_top1"):
        assert 0 <= result[key] <= 1, key
    assert (run_dir / "eval" / "zeroshot_confusion.png").is_file()
    assert json.loads((run_dir / "eval" / "zeroshot.json").read_text()) == result

    # Class names from the command line replace the index's; they must fit the labels.
    custom = ["zeroshot", *common, "--classes", "circle,square,triangle,cross,diamond,ring"]
    assert finetune_main([*custom, "zeroshot.templates=['a {}']"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["templates"] == ["a {}"] and again["features_cached"]


def test_zeroshot_refuses_a_run_that_is_not_clip(tiny_run, tmp_path, capsys):
    assert pretrain_main([*tiny_run, "train.steps=1", "train.run_name=mae"]) == 0
    capsys.readouterr()
    code = finetune_main(["zeroshot", "--encoder", str(tmp_path / "runs" / "mae"), "--no-wandb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "zeroshot needs a run of the clip objective" in err[0]
