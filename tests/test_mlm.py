"""Masked language modelling (`mlm`): BERT's masking statistics, the loss against a loop-by-loop
reference, the tied head, bidirectional attention, the text-only reader, exact resume, the text
encoder export, CLIP's warm start from it and `finetune mlm`; W processes == one process in
float64 (tests/workers/mlm_worker.py)."""

import json
import random
import shutil
import subprocess

import pytest
import torch
from helpers import PYTHON, WORKERS, free_port, python_env, train_on_two_ranks
from open_clip.transformer import TextTransformer
from safetensors.torch import load_file

from finetune.__main__ import main as finetune_main
from pretrain.__main__ import main as pretrain_main
from pretrain.checkpoint import list_checkpoints, load_checkpoint
from pretrain.config import load_config
from pretrain.data import eval_loader, train_loader, write_shards
from pretrain.data.demo import BACKGROUNDS, COLOURS, SHAPES, SIZES, caption, position_name
from pretrain.data.transforms import IGNORE_INDEX, ImageText, MaskedCaption, bert_mask
from pretrain.models.text import CaptionTokenizer, load_text_encoder
from pretrain.objectives import build_objective
from pretrain.objectives.mlm import MaskedLanguageModel, MLMConfig

TINY_MLM = [
    "objective.name=mlm",
    "mlm.context_length=24",
    "mlm.width=32",
    "mlm.layers=1",
    "mlm.heads=2",
    "logging.image_every=0",
]
TINY_CLIP_TEXT = [  # a CLIP text tower of TINY_MLM's shape
    "clip.embed_dim=16",
    "clip.context_length=24",
    "clip.text_width=32",
    "clip.text_layers=1",
    "clip.text_heads=2",
]


def demo_captions(count: int, seed: int = 0) -> list[str]:
    draw = random.Random(seed)
    return [
        caption(
            draw.choice(list(SIZES)),
            draw.choice(list(COLOURS)),
            draw.choice(SHAPES),
            position_name(draw.randrange(3), draw.randrange(3)),
            draw.choice(BACKGROUNDS),
        )
        for _ in range(count)
    ]


def corrupt(tokenizer: CaptionTokenizer, tokens: torch.Tensor, seed: int, **masking):
    return bert_mask(
        tokens,
        mask_id=tokenizer.mask_id,
        end_id=tokenizer.end_id,
        special_ids=(tokenizer.start_id, tokenizer.end_id),
        random_ids=(1, tokenizer.start_id),
        generator=torch.Generator().manual_seed(seed),
        **masking,
    )


# --- masking --------------------------------------------------------------------------------------


def test_bert_masking_statistics_over_many_draws():
    tokenizer = CaptionTokenizer(16)  # some demo captions (13-15 tokens + 2) are cut at 16
    tokens = tokenizer(demo_captions(4000))  # [N, 16]
    inputs, targets = corrupt(tokenizer, tokens, seed=0)
    # Candidates written out per row: after the start token, before the end token.
    candidate = torch.zeros_like(tokens, dtype=torch.bool)
    for row, ids in enumerate(tokens.tolist()):
        end = ids.index(tokenizer.end_id)
        candidate[row, 1:end] = True
    assert (tokens[:, -1] == tokenizer.end_id).any(), "no caption was cut at the context length"
    chosen = targets != IGNORE_INDEX

    assert not (chosen & ~candidate).any()  # start, end and padding are never chosen
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # and never changed
    assert torch.equal(targets[chosen], tokens[chosen])
    fraction = chosen.sum() / candidate.sum()  # ~52k candidates: 4 sd = 0.006
    assert abs(fraction.item() - 0.15) < 0.006, fraction
    # The choice does not depend on the position: the first and the last word alike (4 sd).
    last_word = candidate.sum(dim=1)  # [N]: the position before the end token
    for rate in (
        chosen[:, 1].float().mean(),
        chosen[torch.arange(len(tokens)), last_word].float().mean(),
    ):
        assert abs(rate.item() - 0.15) < 0.023, rate

    masked = chosen & (inputs == tokenizer.mask_id)
    kept = chosen & (inputs == tokens)
    randomized = chosen & ~masked & ~kept
    count = chosen.sum().item()  # ~7.8k: 4 sd = 0.018 (80%), 0.014 (10%)
    assert abs(masked.sum().item() / count - 0.8) < 0.018
    assert abs(randomized.sum().item() / count - 0.1) < 0.014
    assert abs(kept.sum().item() / count - 0.1) < 0.014
    drawn = inputs[randomized]  # random replacements: real BPE ids, never special or padding
    assert ((drawn >= 1) & (drawn < tokenizer.start_id)).all()
    assert drawn.unique().numel() > 0.9 * drawn.numel()  # spread over the vocabulary

    again = corrupt(tokenizer, tokens, seed=0)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)


def test_evaluation_masks_depend_on_the_sample_key_only():
    tokenizer = CaptionTokenizer(24)
    masking = {"choose": 0.5, "to_mask": 1.0, "to_random": 0.0}
    transform = MaskedCaption(tokenizer, masking, key_seed=7)
    text = demo_captions(1)[0]
    first = transform({"key": "val-0000001", "caption": text})
    torch.rand(100)  # the global RNG plays no part
    again = transform({"key": "val-0000001", "caption": text})
    other = transform({"key": "val-0000002", "caption": text})
    assert torch.equal(first["text_targets"], again["text_targets"])
    assert not torch.equal(first["text_targets"], other["text_targets"])
    chosen = first["text_targets"] != IGNORE_INDEX
    assert (first["text"][chosen] == tokenizer.mask_id).all()
    with pytest.raises(ValueError, match="no caption"):
        transform({"key": "x"})


# --- the model ------------------------------------------------------------------------------------


def tiny_model(dtype=torch.float64) -> MaskedLanguageModel:
    torch.manual_seed(0)
    return MaskedLanguageModel(MLMConfig(context_length=24, width=32, layers=2, heads=2)).to(dtype)


def tiny_batch(model: MaskedLanguageModel, count: int = 6, seed: int = 1) -> dict:
    tokens = model.tokenizer(demo_captions(count, seed))
    inputs, targets = corrupt(model.tokenizer, tokens, seed, choose=0.3)
    return {"text": inputs, "text_targets": targets}


def test_loss_top1_and_perplexity_match_a_loop_by_loop_reference():
    model = tiny_model()
    batch = tiny_batch(model)
    out = model(batch)

    hidden = model.encoder(batch["text"])  # [B, T, W]
    vocab = model.tokenizer.vocab_size
    embedding = model.encoder.token_embedding.weight[:vocab]  # [V, W]: the tied output rows
    losses, hits = [], 0
    for row in range(batch["text"].shape[0]):
        for position in range(batch["text"].shape[1]):
            target = int(batch["text_targets"][row, position])
            if target == IGNORE_INDEX:
                continue
            features = model.head.transform(hidden[row, position])  # [W]
            scores = embedding @ features + model.head.bias  # [V]
            top = scores.max()
            log_normaliser = top + torch.log(torch.exp(scores - top).sum())
            losses.append(log_normaliser - scores[target])
            hits += int(int(scores.argmax()) == target)
    assert len(losses) >= 10
    reference = torch.stack(losses).mean()
    torch.testing.assert_close(out["loss"], reference, rtol=0, atol=1e-12)
    assert out["top1"].item() == hits / len(losses)
    torch.testing.assert_close(out["perplexity"], reference.exp(), rtol=1e-12, atol=0)


def test_the_prediction_head_is_tied_to_the_token_embedding():
    model = tiny_model()
    vocab, width = model.tokenizer.vocab_size, 32
    embedding = model.encoder.token_embedding.weight
    assert embedding.shape == (vocab + 1, width)  # + the mask token, id = vocab
    head_shapes = {name: tuple(p.shape) for name, p in model.head.named_parameters()}
    assert head_shapes["bias"] == (vocab,)
    assert not any(vocab in shape for name, shape in head_shapes.items() if name != "bias")
    batch = tiny_batch(model)
    model(batch)["loss"].backward()
    # Rows of ids absent from the input get gradient only through the output side.
    absent = sorted(set(range(1, 1000)) - set(batch["text"].flatten().tolist()))[:5]
    assert (embedding.grad[absent].abs().sum(dim=1) > 0).all()
    # And the logits move with the embedding.
    chosen = batch["text_targets"] != IGNORE_INDEX
    before = model.predict(batch["text"], chosen)[:, absent[0]].detach()
    with torch.no_grad():
        # not a constant shift: the head's LayerNorm'd features sum to zero and would cancel it
        embedding[absent[0]] += torch.randn(width, dtype=embedding.dtype)
    after = model.predict(batch["text"], chosen)[:, absent[0]].detach()
    assert not torch.allclose(before, after)


def test_attention_is_bidirectional_and_ignores_padding():
    model = tiny_model()
    tokens = model.tokenizer(["a small red triangle at the top left"])  # [1, 24]
    changed = tokens.clone()
    changed[0, 6] = model.tokenizer.mask_id  # a later word
    encoder = model.encoder
    assert encoder.attn_mask is None  # no causal mask
    assert not torch.allclose(encoder(tokens)[0, 2], encoder(changed)[0, 2])
    # The same weights with the causal mask: position 2 cannot see position 6 (the check can fail).
    causal = TextTransformer(**{**model.spec.kwargs, "no_causal_mask": False})
    causal.load_state_dict(encoder.state_dict())
    assert torch.allclose(causal(tokens)[0, 2], causal(changed)[0, 2])
    # Padding (id 0) is never attended to: its embedding does not reach the real tokens.
    real = int((tokens != 0).sum())
    before = encoder(tokens)[0, :real]
    with torch.no_grad():
        encoder.token_embedding.weight[0] += 5.0
    torch.testing.assert_close(encoder(tokens)[0, :real], before)


def test_captions_are_read_without_decoding_images(tmp_path):
    samples = [
        {"__key__": f"s{index:03d}", "png": b"not an image", "txt": text}
        for index, text in enumerate(demo_captions(12))
    ]
    write_shards(samples, tmp_path, prefix="train", max_count=6, progress=False)
    tokenizer = CaptionTokenizer(24)
    masked = MaskedCaption(tokenizer, {"choose": 0.15, "to_mask": 0.8, "to_random": 0.1})
    arguments = dict(
        batch_size=4, steps_per_epoch=3, epoch=0, seed=0, rank=0, world_size=1, num_workers=0
    )
    loader = train_loader(str(tmp_path), masked, **arguments)
    batches = list(loader)
    assert len(batches) == 3 and loader.skipped == 0
    assert "image" not in batches[0] and batches[0]["text"].shape == (4, 24)
    evaluation = eval_loader(str(tmp_path), masked, 4, rank=0, world_size=1, num_workers=0)
    assert sum(len(batch["key"]) for batch in evaluation) == 12 and evaluation.skipped == 0
    # The same shards through an image transform: every sample is unreadable.
    image_text = ImageText(lambda image: image, tokenizer)
    images = eval_loader(str(tmp_path), image_text, 4, rank=0, world_size=1, num_workers=0)
    assert list(images) == [] and images.skipped == 12


def test_bad_mlm_settings_are_one_line_config_errors(capsys):
    code = pretrain_main([*TINY_MLM, "mlm.replace_with_mask=0.95"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "replace_with_random must not exceed 1" in err[0]


# --- W processes == one process -------------------------------------------------------------------


def _mlm_step(tmp_path, normalisation: str, processes: int) -> dict:
    out_file = tmp_path / f"mlm-{normalisation}-{processes}.pt"
    command = [
        PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(free_port()),
        str(WORKERS / "mlm_worker.py"), str(out_file), normalisation,
    ]  # fmt: skip
    result = subprocess.run(
        command, env=python_env(), capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_file, weights_only=True)


@pytest.mark.distributed
def test_two_processes_train_exactly_like_one_on_the_global_batch(tmp_path):
    single = _mlm_step(tmp_path, "global", 1)
    double = _mlm_step(tmp_path, "global", 2)
    first, second = double["chosen_per_process"]
    assert first != second  # uneven masked counts: a per-process mean would be wrong
    assert abs(single["loss"] - double["loss"]).item() <= 1e-10
    for part in ("grads", "params"):
        assert single[part].keys() == double[part].keys()
        for key, value in single[part].items():
            gap = (value - double[part][key]).abs().max().item()
            assert gap <= 1e-10, f"{part} of {key} differ by {gap:.3g}"
    # Each process normalising by its own count is another loss: the check can fail.
    local = _mlm_step(tmp_path, "local", 2)
    assert abs(local["loss"] - single["loss"]).item() > 1e-5  # all near ln(V) at initialisation
    gap = max((local["grads"][k] - single["grads"][k]).abs().max().item() for k in single["grads"])
    assert gap > 1e-6


# --- runs -----------------------------------------------------------------------------------------


def run_cli(args, capsys):
    code = pretrain_main(args)
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def test_mlm_run_logs_its_metrics_and_exports_a_rebuildable_text_encoder(
    tiny_run, tmp_path, capsys
):
    code, out, _ = run_cli([*tiny_run, *TINY_MLM, "train.run_name=mlm"], capsys)
    assert code == 0
    summary = json.loads(out[-1])
    run_dir = tmp_path / "runs" / "mlm"
    assert summary["objective"] == "mlm" and summary["steps"] == 6
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "top1", "perplexity"} <= set(metrics[-1])
    assert 0 <= metrics[-1]["top1"] <= 1 and metrics[-1]["perplexity"] > 1
    export = run_dir / "export"
    assert summary["export"] == str(export / "text_encoder.safetensors")
    assert not (export / "encoder.json").exists()  # no image encoder in this run
    # The card rebuilds the encoder with open_clip alone, strict, and names the tokenizer.
    card = json.loads((export / "text_encoder.json").read_text())
    encoder = TextTransformer(**card["open_clip_kwargs"])
    encoder.load_state_dict(load_file(export / "text_encoder.safetensors"), strict=True)
    from open_clip.tokenizer import SimpleTokenizer

    settings = card["tokenizer"]
    tokenizer = SimpleTokenizer(
        context_length=settings["context_length"],
        additional_special_tokens=settings["additional_special_tokens"],
    )
    assert tokenizer.encoder["<mask>"] == settings["mask_token_id"] == 49408
    ids = tokenizer(["a red <mask> in the center"])
    assert encoder(ids).shape == (1, 24, 32)
    assert card["objective"] == "mlm" and card["steps"] == 6


def test_mlm_resume_continues_exactly_like_an_uninterrupted_run(tiny_run, tmp_path, capsys):
    common = [*tiny_run, *TINY_MLM, "train.grad_accum=2", "data.num_workers=2"]
    assert run_cli([*common, "train.run_name=straight"], capsys)[0] == 0
    assert run_cli([*common, "train.run_name=broken"], capsys)[0] == 0
    broken = tmp_path / "runs" / "broken"
    for later in list_checkpoints(broken)[1:]:  # a crash right after the step-3 checkpoint
        shutil.rmtree(later)
    code, out, _ = run_cli(["--resume", str(broken)], capsys)
    assert code == 0 and json.loads(out[-1])["steps"] == 6
    straight = load_checkpoint(list_checkpoints(tmp_path / "runs" / "straight")[-1])
    resumed = load_checkpoint(list_checkpoints(broken)[-1])
    for name, tensor in straight[0].items():
        assert torch.equal(tensor, resumed[0][name]), name


@pytest.mark.distributed
def test_two_process_mlm_run_keeps_replicas_identical(tiny_run, tmp_path):
    overrides = [*tiny_run, *TINY_MLM, "train.run_name=mlm", "train.steps=4"]
    rank0, rank1, output = train_on_two_ranks(tmp_path, overrides)
    for key, tensor in rank0.items():
        assert torch.equal(tensor, rank1[key]), key
    metrics = (tmp_path / "runs" / "mlm" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 4 and "2 process(es)" in output


# --- CLIP from an mlm run, and the evaluations ----------------------------------------------------


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, demo_dir):
    """A tiny mlm run directory, trained once for the tests below."""
    root = tmp_path_factory.mktemp("mlm_run")
    args = [
        f"data.demo_dir={demo_dir}", "data.demo_train_samples=256", "data.demo_val_samples=64",
        "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=64",
        "data.steps_per_epoch=4", "train.steps=4", "schedule.warmup_steps=1",
        "logging.wandb=false", "logging.log_every=2", f"train.output_dir={root}",
        "train.run_name=mlm", *TINY_MLM,
    ]  # fmt: skip
    assert pretrain_main(args) == 0
    return root / "mlm"


def test_clip_text_tower_starts_from_the_mlm_export(mlm_run):
    common = ["objective.name=clip", "model.patch_size=8", "model.kwargs={depth: 1}"]
    fresh_config = load_config(None, [*common, *TINY_CLIP_TEXT])
    warm_config = load_config(None, [*common, *TINY_CLIP_TEXT, f"clip.text_init={mlm_run}"])
    torch.manual_seed(0)
    fresh, _ = build_objective(fresh_config)
    torch.manual_seed(0)
    warm, _ = build_objective(warm_config)
    exported = load_file(mlm_run / "export" / "text_encoder.safetensors")
    warm_text = warm.text.state_dict()
    for name, tensor in exported.items():
        expected = tensor[:49408] if name == "token_embedding.weight" else tensor
        assert torch.equal(warm_text[name], expected), name
    assert not torch.equal(warm_text["ln_final.weight"], fresh.text.state_dict()["ln_final.weight"])
    # What the export lacks keeps its initialisation: the projection and the image tower.
    assert torch.equal(warm.text.text_projection, fresh.text.text_projection)
    for name, tensor in fresh.encoder.state_dict().items():
        assert torch.equal(warm.encoder.state_dict()[name], tensor), name
    assert warm.text.attn_mask is not None  # CLIP's tower stays causal


def test_a_mismatched_or_missing_warm_start_fails_in_one_line(mlm_run, tiny_run, tmp_path, capsys):
    clip = [*tiny_run, "objective.name=clip", *TINY_CLIP_TEXT, "train.run_name=warm"]
    code, _, err = run_cli([*clip, "clip.text_width=64", f"clip.text_init={mlm_run}"], capsys)
    assert code == 2 and len(err) == 1 and "width 32 vs 64" in err[0], err
    code, _, err = run_cli([*clip, f"clip.text_init={tmp_path / 'nowhere'}"], capsys)
    assert code == 2 and len(err) == 1 and "no text encoder export" in err[0], err
    assert not (tmp_path / "runs").exists()
    tower = TextTransformer(context_length=24, width=32, heads=2, layers=2, output_dim=16)
    with pytest.raises(Exception, match="layers 1 vs 2"):
        load_text_encoder(tower, mlm_run)


def test_finetune_mlm_reports_top1_beside_random_init_and_the_most_frequent_token(mlm_run, capsys):
    common = ["mlm", "--encoder", str(mlm_run), "--workers", "0", "--no-wandb"]
    assert finetune_main([*common, "--compare-random-init"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["objective"] == "mlm" and result["val_captions"] == 64
    for key in ("top1", "random_init_top1", "most_frequent_top1"):
        assert 0 <= result[key] <= 1, key
    assert result["most_frequent_token"] == "a"  # twice in every demo caption
    assert result["masked_tokens"] > 64 and result["masking"]["to_mask"] == 1.0
    saved = json.loads((mlm_run / "eval" / "mlm.json").read_text())
    assert saved == result
    # The same masks again: the numbers repeat exactly.
    assert finetune_main(common) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["top1"] == result["top1"] and again["masked_tokens"] == result["masked_tokens"]
    # An image evaluation of an mlm run points at `finetune mlm`.
    assert finetune_main(["linear", "--encoder", str(mlm_run), "--no-wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finetune mlm" in err[0]


def test_zeroshot_on_a_warm_started_clip_run_needs_no_mlm_run(mlm_run, tiny_run, tmp_path, capsys):
    moved = tmp_path / "mlm_copy"
    shutil.copytree(mlm_run, moved)
    clip = [*tiny_run, "objective.name=clip", *TINY_CLIP_TEXT, "logging.image_every=0"]
    run = [*clip, "train.steps=2", "train.run_name=warm", f"clip.text_init={moved}"]
    assert pretrain_main(run) == 0
    shutil.rmtree(moved)  # the CLIP run's checkpoint holds its text tower
    capsys.readouterr()
    command = ["zeroshot", "--encoder", str(tmp_path / "runs" / "warm"), "--workers", "0"]
    assert finetune_main([*command, "--no-wandb", "--compare-random-init"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= result["top1"] <= 1 and 0 <= result["random_init_image_to_text_r1"] <= 1
    code = finetune_main(["mlm", "--encoder", str(tmp_path / "runs" / "warm"), "--no-wandb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no encoder export" in err[0], err
