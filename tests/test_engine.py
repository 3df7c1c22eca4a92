import json

import pytest
import timm
import torch
from helpers import train_on_two_ranks
from safetensors.torch import load_file

from pretrain.__main__ import main as pretrain_main
from pretrain.checkpoint import list_checkpoints, load_checkpoint


def run_cli(args, capsys):
    code = pretrain_main(args)
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def test_cli_smoke_run_on_demo_data(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, out, _ = run_cli([*tiny_run, "logging.wandb=true", "train.run_name=smoke"], capsys)
    assert code == 0
    summary = json.loads(out[-1])
    run_dir = tmp_path / "runs" / "smoke"
    assert summary["objective"] == "mae" and summary["steps"] == 6
    assert summary["run_dir"] == str(run_dir)
    # Run directory: resolved config, metrics, pictures, checkpoints, export.
    assert "train_shards" in (run_dir / "config.yaml").read_text()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6]
    assert all(m["loss"] > 0 and m["lr"] > 0 and m["img_per_s"] > 0 for m in metrics)
    assert {"grad_norm", "skipped_samples", "epoch"} <= set(metrics[0])
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == [
        "reconstruction_step0000003.png",
        "reconstruction_step0000006.png",
    ]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000003", "step_0000006"]
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"
    # The export rebuilds with plain timm, strict.
    card = json.loads((run_dir / "export" / "encoder.json").read_text())
    encoder = timm.create_model(card["timm_name"], **card["timm_kwargs"])
    encoder.load_state_dict(load_file(run_dir / "export" / "encoder.safetensors"), strict=True)
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_run, tmp_path, capsys):
    accumulate = ["train.grad_accum=2", "data.num_workers=2"]
    assert run_cli([*tiny_run, *accumulate, "train.run_name=straight"], capsys)[0] == 0
    assert run_cli([*tiny_run, *accumulate, "train.run_name=broken"], capsys)[0] == 0
    broken = tmp_path / "runs" / "broken"
    # Simulate a crash right after the step-3 checkpoint: the later state never happened.
    for later in list_checkpoints(broken)[1:]:
        for path in later.iterdir():
            path.unlink()
        later.rmdir()
    code, out, _ = run_cli(["--resume", str(broken)], capsys)
    assert code == 0 and json.loads(out[-1])["steps"] == 6
    straight_state = load_checkpoint(list_checkpoints(tmp_path / "runs" / "straight")[-1])
    resumed_state = load_checkpoint(list_checkpoints(broken)[-1])
    for name, tensor in straight_state[0].items():
        assert torch.equal(tensor, resumed_state[0][name]), name
    assert straight_state[2]["step"] == resumed_state[2]["step"] == 6


def test_the_same_command_again_continues_the_run_other_settings_refused(tiny_run, capsys):
    assert run_cli([*tiny_run, "train.steps=3", "train.run_name=twice"], capsys)[0] == 0
    # Same command, longer: continues from the step-3 checkpoint instead of starting over.
    code, out, _ = run_cli([*tiny_run, "train.steps=5", "train.run_name=twice"], capsys)
    assert code == 0 and json.loads(out[-1])["steps"] == 5
    assert any("resumed at step 3" in line for line in out)
    # Other model settings under the same run name: refused in one line naming the key.
    changed = [*tiny_run, "train.steps=5", "train.run_name=twice", "mae.decoder_dim=16"]
    code, _, err = run_cli(changed, capsys)
    assert code == 2 and len(err) == 1 and "mae.decoder_dim" in err[0], err


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.train_shards={tmp}/nowhere-{{000000..000003}}.tar", "nowhere-000000.tar"),
        ("data.train_shards={tmp}/emptydir", "no shards"),
        ("model.name=vit_nonexistent_model", "unknown timm model 'vit_nonexistent_model'"),
        ("objective.name=byol", "unknown objective 'byol'"),
    ],
)
def test_bad_input_fails_in_one_line_without_a_run_dir(
    tiny_run, tmp_path, capsys, override, fragment
):
    (tmp_path / "emptydir").mkdir()
    override = override.format(tmp=tmp_path)
    code, out, err = run_cli([*tiny_run, override], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.distributed
def test_two_gloo_processes_train_identical_replicas(tiny_run, tmp_path):
    """A real `accelerate launch` of 2 CPU processes: DDP keeps the replicas bit-identical."""
    rank0, rank1, output = train_on_two_ranks(
        tmp_path, [*tiny_run, "train.run_name=ddp", "train.steps=4"]
    )
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name
    metrics = (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 4
    assert "2 process(es)" in output


def test_an_unrelated_folder_is_never_taken_over(tiny_run, tmp_path, capsys):
    precious = tmp_path / "runs" / "precious"
    precious.mkdir(parents=True)
    (precious / "notes.txt").write_text("keep me")
    code, _, err = run_cli([*tiny_run, "train.run_name=precious"], capsys)
    assert code == 2 and "is not a run directory" in err[0]
    assert (precious / "notes.txt").read_text() == "keep me"


def test_time_limit_ends_the_run_like_a_finished_one(tiny_run, tmp_path, capsys):
    # A budget far below one step: the run stops after its first step, then checkpoints and
    # exports as if train.steps had been reached.
    overrides = [*tiny_run, "train.run_name=budget", "train.time_limit_minutes=1e-6"]
    code, out, _ = run_cli(overrides, capsys)
    assert code == 0
    summary = json.loads(out[-1])
    assert summary["steps"] == 1 and summary["time_limit_reached"] is True
    run_dir = tmp_path / "runs" / "budget"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000001"]
    assert (run_dir / "export" / "encoder.safetensors").is_file()
    # The same command again continues toward train.steps (the budget applies per invocation).
    code, out, _ = run_cli([*tiny_run, "train.run_name=budget"], capsys)
    assert code == 0 and json.loads(out[-1])["steps"] == 6


def test_compiled_run_trains_and_saves_the_same_keys_as_an_eager_one(tiny_run, tmp_path, capsys):
    common = [*tiny_run, "train.steps=2", "train.checkpoint_every=2", "logging.image_every=0"]
    code, out, _ = run_cli([*common, "train.run_name=eager"], capsys)
    assert code == 0
    code, out, _ = run_cli([*common, "train.run_name=compiled", "train.compile=true"], capsys)
    assert code == 0 and json.loads(out[-1])["steps"] == 2
    eager_model, _, _ = load_checkpoint(list_checkpoints(tmp_path / "runs" / "eager")[-1])
    compiled_model, _, _ = load_checkpoint(list_checkpoints(tmp_path / "runs" / "compiled")[-1])
    assert list(compiled_model) == list(eager_model)  # no "_orig_mod." prefixes
    assert all(torch.isfinite(tensor).all() for tensor in compiled_model.values())
    export = load_file(tmp_path / "runs" / "compiled" / "export" / "encoder.safetensors")
    assert set(export) == set(
        load_file(tmp_path / "runs" / "eager" / "export" / "encoder.safetensors")
    )
