"""What every benchmark shares around its measurements: the description of the machine it ran
on, and its output (one JSON document on stdout, a short table on stderr, optionally a file)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

import torch

ROOT = Path(__file__).resolve().parents[1]


def parser(description: str) -> argparse.ArgumentParser:
    arguments = argparse.ArgumentParser(description=description)
    arguments.add_argument("--out", type=Path, help="also write the JSON here")
    return arguments


def run_cli(command: list[str], log: Path) -> dict:
    """Run one of the project's CLIs from the repository root, its progress bars appended to
    `log`; returns the JSON of its last stdout line (the CLIs' result)."""
    with open(log, "a") as errors:
        result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}); see {log}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def fail(message: str) -> NoReturn:
    """A user error: one line on stderr, exit status 2, as the project's CLIs do."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def environment(device: torch.device) -> dict:
    """The facts that make a figure comparable: date, software, threads, CPU/GPU, load."""
    described = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        # other work on the machine skews absolute numbers; ratios taken in one run much less
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def emit(result: dict, rows: list[dict], out: Path | None = None) -> None:
    """The JSON document to stdout (and `out`), the table rows to stderr."""
    _print_table(rows)
    text = json.dumps(result, indent=1, default=_plain)
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _print_table(rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(row[i]) for row in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in cells]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 100000:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)
