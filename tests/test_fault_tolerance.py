"""Fault tolerance with real processes: SIGKILL and SIGTERM/SIGUSR1 mid-run, a kill during a
checkpoint save, damaged shards, NaN losses; and the security rules for what gets loaded or run.

The 2-process runs go through launch/local_cpu.sh (accelerate launch, gloo on CPU), each with
its own port and a timeout; a SIGKILL goes to the whole process tree at once (launcher, training
processes, loader workers), as when a node dies.
"""

import ast
import io
import json
import os
import re
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from helpers import (
    PYTHON,
    ROOT,
    WORKERS,
    free_port,
    kill_after_checkpoint,
    kill_tree,
    python_env,
    wait_for,
)
from PIL import Image

from pretrain.__main__ import EXIT_DIVERGED, EXIT_PREEMPTED
from pretrain.__main__ import main as pretrain_main
from pretrain.checkpoint import (
    NonFiniteWeightsError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from pretrain.data import DataError, eval_loader, expand_shards
from pretrain.data.transforms import eval_transform

TIMEOUT = 300  # seconds for any one launched run; the machine may be shared and slow
STEPS = 8


@pytest.fixture(scope="module")
def run_args(demo_dir, tmp_path_factory):
    """Overrides for a tiny deterministic MAE run that checkpoints every step."""
    return [
        f"data.demo_dir={demo_dir}",
        "data.demo_train_samples=256",
        "data.demo_val_samples=64",
        "data.batch_size=8",
        "data.num_workers=1",
        "data.shuffle_buffer=32",
        "data.steps_per_epoch=3",
        "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
        "mae.decoder_dim=16",
        "mae.decoder_depth=1",
        f"train.steps={STEPS}",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=2",
        "schedule.warmup_steps=2",
        "logging.log_every=1",
        "logging.image_every=0",
        "logging.wandb=false",
        f"train.output_dir={tmp_path_factory.mktemp('fault') / 'runs'}",
    ]


def run_dir_of(run_args, name) -> Path:
    output_dir = next(a for a in run_args if a.startswith("train.output_dir=")).split("=", 1)[1]
    return Path(output_dir) / name


def local_cpu(args, log_path, **popen):
    """launch/local_cpu.sh: 2 gloo CPU processes under accelerate launch."""
    env = {**python_env(), "PYTHON": PYTHON, "PORT": str(free_port()), "NPROC": "2"}
    log = open(log_path, "a")
    return subprocess.Popen(
        ["bash", str(ROOT / "launch" / "local_cpu.sh"), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **popen,
    )


def finish(process, log_path) -> str:
    try:
        process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
    return log_path.read_text()


def final_weights(run_dir):
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint.name == f"step_{STEPS:07d}"
    return load_checkpoint(checkpoint)[0]


def assert_same_weights(expected: dict, actual: dict):
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


@pytest.fixture(scope="module")
def uninterrupted(run_args, tmp_path_factory):
    """Final weights of the 2-process run that nothing interrupts."""
    log = tmp_path_factory.mktemp("straight") / "log"
    output = finish(local_cpu([*run_args, "train.run_name=straight"], log), log)
    assert "2 process(es)" in output and f'"steps": {STEPS}' in output, output[-3000:]
    return final_weights(run_dir_of(run_args, "straight"))


# --- interruptions ------------------------------------------------------------------------------


@pytest.mark.distributed
def test_sigkill_mid_run_then_the_same_command_resumes_exactly(run_args, uninterrupted, tmp_path):
    args = [*run_args, "train.run_name=killed"]
    run_dir = run_dir_of(run_args, "killed")
    log = tmp_path / "log"
    process = local_cpu(args, log)
    killed_at = kill_after_checkpoint(process, run_dir, 3)
    assert 3 <= killed_at < STEPS, "the run finished before it could be killed"

    output = finish(local_cpu(args, log), log)  # the same command again
    assert f"resumed at step {killed_at}" in output, output[-3000:]
    assert_same_weights(uninterrupted, final_weights(run_dir))


@pytest.mark.distributed
def test_sigterm_checkpoints_all_ranks_and_the_rerun_resumes(run_args, uninterrupted, tmp_path):
    """SIGTERM to the launcher (what a container runtime sends): torch's launcher passes it to
    both ranks (and their loader workers), which agree on the step, checkpoint, and stop; the
    rerun resumes there and logs to the same W&B run."""
    args = [*run_args, "train.run_name=terminated", "logging.wandb=true"]
    run_dir = run_dir_of(run_args, "terminated")
    log = tmp_path / "log"
    process = local_cpu(args, log)
    wait_for(lambda: latest_checkpoint(run_dir) is not None, "the first checkpoint")
    process.send_signal(signal.SIGTERM)
    output = finish(process, log)
    stopped_at = int(output.split("stopped by SIGTERM after step ")[1].split()[0])
    assert stopped_at < STEPS and latest_checkpoint(run_dir).name == f"step_{stopped_at:07d}"
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output, output
    assert not (run_dir / "export").exists()  # a stopped run is not finished

    output = finish(local_cpu(args, log), log)
    assert f"resumed at step {stopped_at}" in output, output[-3000:]
    assert_same_weights(uninterrupted, final_weights(run_dir))
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id) for p in offline_runs)


def test_sigusr1_stops_a_single_process_run_with_the_documented_code(run_args, tmp_path):
    args = [*run_args, "train.run_name=usr1", "train.steps=40"]
    run_dir = run_dir_of(run_args, "usr1")
    process = subprocess.Popen(
        [PYTHON, "-m", "pretrain", *args],
        env=python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for(lambda: latest_checkpoint(run_dir) is not None, "the first checkpoint")
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == EXIT_PREEMPTED == 75, err[-3000:]
    stopped_at = int(err.split("stopped by SIGUSR1 after step ")[1].split()[0])
    assert latest_checkpoint(run_dir).name == f"step_{stopped_at:07d}"


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(run_args, tmp_path):
    args = [*run_args, "train.run_name=save-killed", "train.steps=5"]
    run_dir = run_dir_of(run_args, "save-killed")
    worker = WORKERS / "fault_slow_save_worker.py"
    process = subprocess.Popen(
        [PYTHON, str(worker), str(tmp_path), "3", *args],
        env=python_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (tmp_path / "saving").exists(), "the step-3 save to start")
    finally:
        kill_tree(process.pid)
        process.wait(timeout=60)
    # Step 3's files were written but never renamed into place: step 2 is still the latest.
    partial = run_dir / "checkpoints" / ".partial-step_0000003"
    assert (partial / "model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000001", "step_0000002"]
    model_state, _, state = load_checkpoint(latest_checkpoint(run_dir))
    assert state["step"] == 2 and model_state

    assert pretrain_main(args) == 0  # the same command resumes from step 2 and finishes
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000004", "step_0000005"]
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


# --- damaged data ------------------------------------------------------------------------------


def _jpeg(image_bytes: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes)).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_shard(path, samples, corrupt=lambda index: False):
    with wds.TarWriter(str(path)) as writer:
        for index, (key, image, label) in enumerate(samples):
            image = image[: len(image) // 2] if corrupt(index) else image  # cut JPEG
            writer.write({"__key__": key, "jpg": image, "cls": label})


@pytest.fixture(scope="module")
def damaged_shards(demo_dir, tmp_path_factory):
    """good.tar (64 JPEGs), corrupt.tar (every second JPEG cut in half), truncated.tar (a tar cut
    off in the middle), vanishing.tar (good, deleted while the run reads)."""
    from pretrain.data import ensure_demo_data

    folder = tmp_path_factory.mktemp("damaged")
    demo = ensure_demo_data(demo_dir, 256, 64, 32, seed=0)
    samples = []
    for shard in expand_shards(demo["train"]):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name in sorted(files):
            if name.endswith(".png"):
                key = name[: -len(".png")]
                samples.append((key, _jpeg(files[name]), files[f"{key}.cls"]))
    _write_shard(folder / "good.tar", samples[0:64])
    _write_shard(folder / "corrupt.tar", samples[64:128], corrupt=lambda index: index % 2 == 1)
    _write_shard(folder / "whole.tar", samples[128:192])
    whole = (folder / "whole.tar").read_bytes()
    (folder / "truncated.tar").write_bytes(whole[: len(whole) // 2 + 1000])
    (folder / "whole.tar").unlink()
    _write_shard(folder / "vanishing.tar", samples[192:256])
    return folder


@pytest.mark.distributed
def test_damaged_missing_and_uneven_shards_do_not_stop_two_processes(
    run_args, damaged_shards, tmp_path
):
    folder = damaged_shards
    # Every training shard is damaged or vanishes, so that both ranks meet bad data.
    train = ",".join(
        str(folder / name) for name in ("corrupt.tar", "truncated.tar", "vanishing.tar")
    )
    # Exact evaluation split: 3 shards over 2 ranks (rank 1 gets fewer), and 1 shard (rank 1 none).
    val_a = ",".join(str(folder / name) for name in ("good.tar", "corrupt.tar", "truncated.tar"))
    val_b = str(folder / "good.tar")
    run_dir = run_dir_of(run_args, "damaged")
    args = [*run_args, "train.run_name=damaged", f"data.train_shards={train}", "train.steps=6"]
    log = tmp_path / "log"
    worker = str(WORKERS / "fault_bad_data_worker.py")
    command = [
        PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        worker, str(tmp_path), val_a, val_b, *args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=python_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT
    )
    # A shard that was there at the start disappears while the run reads.
    wait_for(lambda: (run_dir / "run.json").is_file(), "the run to start")
    (folder / "vanishing.tar").unlink()
    output = finish(process, log)
    assert process.returncode == 0, output[-3000:]
    summary = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
    per_rank = summary["skipped_samples_per_rank"]
    assert len(per_rank) == 2 and all(count > 0 for count in per_rank), per_rank
    assert summary["skipped_samples"] == sum(per_rank)
    assert "skipped unreadable data" in output  # the first few skips are logged with a reason
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 6 and metrics[-1]["skipped_samples"] > 0

    # Evaluation: every readable sample exactly once over both ranks, a rank without shards too.
    ranks = [json.loads((tmp_path / f"eval_rank{r}.json").read_text()) for r in (0, 1)]
    for name, spec in (("a", val_a), ("b", val_b)):
        alone = eval_loader(spec.split(","), eval_transform(32), 8, 0, 1, num_workers=0)
        expected = sum(len(batch["image"]) for batch in alone)
        assert sum(rank[name]["samples"] for rank in ranks) == expected
    assert ranks[1]["b"]["samples"] == 0 and ranks[0]["b"]["samples"] == 64
    assert ranks[1]["a"]["skipped"] > 0  # corrupt.tar went to rank 1


# --- non-finite losses --------------------------------------------------------------------------


def nonfinite_run(run_args, tmp_path, name, nan_steps, extra=()):
    worker = str(WORKERS / "fault_nonfinite_worker.py")
    command = [
        PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        worker, str(tmp_path), nan_steps, "1",
        *run_args, f"train.run_name={name}", "train.keep_checkpoints=0", *extra,
    ]  # fmt: skip
    log = tmp_path / "log"
    process = subprocess.Popen(
        command, env=python_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT
    )
    return finish(process, log), process.returncode


@pytest.mark.distributed
def test_a_nan_loss_on_one_rank_skips_that_step_on_every_rank(run_args, tmp_path):
    output, code = nonfinite_run(run_args, tmp_path, "nan-once", "2,4")
    assert code == 0, output[-3000:]
    summary = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
    assert summary["nonfinite_steps"] == 2
    assert output.count("NaN/Inf loss or gradients, update skipped") == 2
    # The replicas stayed identical and finite, and the skipped step 3 (index 2) left the
    # weights of step 2 untouched.
    rank0 = torch.load(tmp_path / "params_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "params_rank1.pt", weights_only=True)
    assert_same_weights(rank0, rank1)
    assert all(torch.isfinite(tensor).all() for tensor in rank0.values())
    checkpoints = {p.name: p for p in list_checkpoints(run_dir_of(run_args, "nan-once"))}
    before = load_checkpoint(checkpoints["step_0000002"])[0]
    assert_same_weights(before, load_checkpoint(checkpoints["step_0000003"])[0])
    after = load_checkpoint(checkpoints["step_0000004"])[0]
    assert any(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.distributed
def test_nan_losses_in_a_row_stop_the_run_without_saving_nan(run_args, tmp_path):
    output, code = nonfinite_run(
        run_args, tmp_path, "nan-forever", "1,2,3,4,5,6,7", ["train.max_nonfinite_steps=3"]
    )
    # Both ranks stop at the same step; each exits with EXIT_DIVERGED, the launcher with 1.
    assert code != 0 and re.search(rf"exitcode\s*:\s*{EXIT_DIVERGED}\b", output), output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors and "3 steps in a row had NaN/Inf losses" in errors[0]
    checkpoints = list_checkpoints(run_dir_of(run_args, "nan-forever"))
    assert [p.name for p in checkpoints] == ["step_0000001", "step_0000002", "step_0000003"]
    first = load_checkpoint(checkpoints[0])[0]
    for checkpoint in checkpoints[1:]:  # skipped steps: the weights of step 1, finite
        assert_same_weights(first, load_checkpoint(checkpoint)[0])


def test_non_finite_weights_are_never_saved(tmp_path):
    good = {"w": torch.ones(3)}
    save_checkpoint(tmp_path, 1, good, {}, {}, keep=2)
    with pytest.raises(NonFiniteWeightsError, match="w has NaN/Inf"):
        save_checkpoint(tmp_path, 2, {"w": torch.tensor([1.0, float("inf"), 0.0])}, {}, {}, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]


# --- security -----------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_cannot_run_code_when_loaded(tmp_path):
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {}, {}, keep=1)
    marker = tmp_path / "pwned"
    torch.save({"state": _RunsCode(marker)}, path / "optimizer.pt")  # a booby-trapped pickle
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        load_checkpoint(path)
    assert not marker.exists()


def _calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            function = node.func
            called = (
                function.attr
                if isinstance(function, ast.Attribute)
                else getattr(function, "id", None)
            )
            if called == name:
                yield node


def test_library_code_loads_only_tensors_and_runs_no_strings():
    """Every torch.load passes weights_only=True; no pickle, eval/exec, yaml.load or shell."""
    sources = sorted((ROOT / "pretrain").rglob("*.py")) + sorted((ROOT / "finetune").rglob("*.py"))
    assert sources
    for path in sources:
        text = path.read_text()
        tree = ast.parse(text)
        for call in _calls(tree, "load"):
            function = call.func
            owner = getattr(function, "value", None)
            if isinstance(owner, ast.Name) and owner.id == "torch":
                keywords = {k.arg: k.value for k in call.keywords}
                flag = keywords.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}: torch.load"
            assert not (isinstance(owner, ast.Name) and owner.id in ("yaml", "pickle")), path
        for builtin in ("eval", "exec"):  # model.eval() is fine, eval(...) is not
            assert all(isinstance(c.func, ast.Attribute) for c in _calls(tree, builtin)), path
        for shell in ("system", "popen"):
            assert not list(_calls(tree, shell)), f"{path}: {shell}()"
        assert "shell=True" not in text and "import pickle" not in text, path


def test_pipe_shards_run_only_when_allowed(tmp_path, capsys):
    marker = tmp_path / "ran"
    spec = f"pipe:touch {marker} && cat {tmp_path}/none.tar"
    with pytest.raises(DataError, match="allow_pipe"):
        expand_shards(spec)
    with pytest.raises(DataError, match="allow_pipe"):
        eval_loader([spec], eval_transform(32), 8, 0, 1, num_workers=0)
    code = pretrain_main([f"data.train_shards={spec}", f"train.output_dir={tmp_path}/runs"])
    assert code == 2 and "allow_pipe" in capsys.readouterr().err
    assert not marker.exists()
    assert expand_shards(spec, allow_pipe=True) == [spec]  # opted in: taken as given


def test_config_values_are_data_never_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    tagged = f"model.kwargs=!!python/object/apply:os.system ['touch {marker}']"
    assert pretrain_main([tagged, f"train.output_dir={tmp_path}/runs"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    name = f"model.name=__import__('os').system('touch {marker}')"
    assert pretrain_main([name, f"train.output_dir={tmp_path}/runs"]) == 2
    assert not marker.exists() and not (tmp_path / "runs").exists()
