#!/usr/bin/env bash
# Several gloo CPU processes on this machine: `launch/local_cpu.sh [--config FILE] [key=value ...]`.
# NPROC (default 2) processes; PORT (default 29501) must differ between concurrent jobs.
# `--multi_gpu` is what makes accelerate start NPROC processes; the engine itself picks gloo on
# CPU when CUDA is absent (accelerate's `--cpu` would start only one process).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$python" -m accelerate.commands.launch --multi_gpu --num_machines 1 \
    --num_processes "${NPROC:-2}" --main_process_port "${PORT:-29501}" --mixed_precision no \
    -m pretrain "$@"
