"""How the benchmarks measure: step times, model FLOPs, the matmul peak, and peak memory.

Every ratio a benchmark reports (ours vs a peer, one variant vs another, achieved FLOP/s vs the
matmul peak) is measured in one process, back to back, because absolute speeds on a shared
machine move with the load. `compare_interleaved` alternates the variants in rounds so that a
burst of outside load hits all of them alike.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

# --- FLOPs ---------------------------------------------------------------------------------------


def _register_cpu_attention_flops() -> None:
    """FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that
    F.scaled_dot_product_attention dispatches to on CPU, so attention matmuls would count as 0.
    Same formulas as torch's own for the CUDA kernels (two bmm forward, four backward)."""
    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is None or forward in flop_counter.flop_registry:
        return

    def forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, **kwargs):
        kwargs.pop("out_shape", None)
        return flop_counter.sdpa_backward_flop_count(
            grad_shape, query_shape, key_shape, value_shape
        )

    flop_counter.register_flop_formula(forward)(forward_flops)
    if backward is not None:
        flop_counter.register_flop_formula(backward)(backward_flops)


_register_cpu_attention_flops()


def count_flops(run: Callable[[], object]) -> int:
    """Matmul, convolution and attention FLOPs (multiply-add = 2) of everything `run` does.

    Elementwise work (norms, activations, the optimizer) is not counted: this is the "model
    FLOPs" of MFU. Works on the meta device too, where nothing is computed.
    """
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


# --- the dense operations a step does -------------------------------------------------------------

# Matmuls and convolutions: what FLOPs count (attention inside fused kernels aside).
DENSE_OPS = (
    "aten.mm.default",
    "aten.addmm.default",
    "aten.bmm.default",
    "aten.baddbmm.default",
    "aten.convolution.default",
    "aten.convolution_backward.default",
)


class _DenseOpRecorder(TorchDispatchMode):
    """Notes each dense operation's operator and its arguments (tensors as shape, strides and
    dtype; everything else as it is)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in DENSE_OPS:
            described = tuple(
                _TensorSpec(tuple(a.shape), tuple(a.stride()), a.dtype)
                if isinstance(a, torch.Tensor)
                else a
                for a in args
            )
            self.calls.append((func, described, dict(kwargs or {})))
        return func(*args, **(kwargs or {}))


class _TensorSpec(tuple):
    """(shape, stride, dtype) of a recorded tensor argument."""

    def __new__(cls, shape, stride, dtype):
        return super().__new__(cls, (shape, stride, dtype))


def dense_op_replay(run: Callable[[], object], device: torch.device, repeats: int = 3) -> dict:
    """The matmuls and convolutions that `run` does (same shapes, strides and dtypes) replayed
    alone on random data: the FLOP/s a step could reach if everything else (norms, activations,
    attention kernels, the optimizer) were free, i.e. the ceiling its shapes allow."""
    recorder = _DenseOpRecorder()
    with recorder:
        run()
    flops = 0
    replays = []
    for func, described, kwargs in recorder.calls:
        arguments = [
            torch.empty_strided(a[0], a[1], dtype=a[2], device=device).normal_()
            if isinstance(a, _TensorSpec)
            else a
            for a in described
        ]
        replays.append((func, arguments, kwargs))
        flops += count_flops(lambda f=func, a=arguments, k=kwargs: f(*a, **k))
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        for func, arguments, kwargs in replays:
            func(*arguments, **kwargs)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return {"calls": len(replays), "flops": flops, "seconds": best, "flops_per_s": flops / best}


# --- the matmul peak -----------------------------------------------------------------------------


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5
) -> dict:
    """Best FLOP/s of a square matmul (size x size) @ (size x size) over `repeats` tries, at the
    thread count this process runs with: the denominator of MFU, measured, not from a data sheet.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2 * size**3
    torch.mm(a, b)  # first call: library initialisation, not timed
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return {"flops_per_s": flops / best, "size": size, "dtype": str(dtype).replace("torch.", "")}


# --- timing --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], object], steps: int, device: torch.device
) -> list[tuple[float, float]]:
    """(wall seconds, this process's CPU seconds) of each of `steps` calls, the device
    synchronized after each. With one thread, CPU seconds leave out the time the process waited
    for a core that other work held: on a shared machine they are the steadier measure."""
    times = []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        synchronize(device)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def compare_interleaved(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    steps_per_round: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[tuple[float, float]]]:
    """time_steps of each variant, measured in alternating rounds (A B A B ...).

    Each variant first runs `warmup` untimed steps (allocator, lazy init, compilation).
    """
    for step in variants.values():
        for _ in range(warmup):
            step()
        synchronize(device)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            times[name] += time_steps(step, steps_per_round, device)
    return times


def summarize(times: list[tuple[float, float]], items_per_step: int) -> dict:
    """Median and best wall time per step, median CPU time, and items/s at the median wall
    time (robust to outside load) and at the median CPU time."""
    walls, cpus = [wall for wall, _ in times], [cpu for _, cpu in times]
    return {
        "step_s_median": statistics.median(walls),
        "step_s_min": min(walls),
        "cpu_s_median": statistics.median(cpus),
        "steps_timed": len(times),
        "items_per_s": items_per_step / statistics.median(walls),
        "items_per_cpu_s": items_per_step / statistics.median(cpus),
    }


# --- memory --------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _return_freed_memory() -> None:
    """Free what Python and glibc hold on to, so the next peak starts from what is in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the code inside the `with` block.

    CPU: the process's resident set high-water mark (VmHWM), reset on entry through
    /proc/self/clear_refs; `peak_mb` is absolute (interpreter and libraries included) and
    `added_mb` is the peak minus the resident set on entry. CUDA: max_memory_allocated, reset
    on entry. Fields are None where the platform cannot tell.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.baseline_mb: float | None = None
        self.peak_mb: float | None = None

    @property
    def added_mb(self) -> float | None:
        if self.peak_mb is None or self.baseline_mb is None:
            return None
        return self.peak_mb - self.baseline_mb

    def __enter__(self) -> PeakMemory:
        _return_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # "5": reset the peak resident set size to the current one
            rss = _status_kib("VmRSS")
            self.baseline_mb = rss / 1024 if rss is not None else None
        except OSError:
            self.baseline_mb = None  # no way to reset the peak: report nothing false
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.baseline_mb is not None:
            peak = _status_kib("VmHWM")
            self.peak_mb = peak / 1024 if peak is not None else None

    def as_dict(self) -> dict:
        kind = "max_allocated" if self.device.type == "cuda" else "rss"
        return {
            "kind": kind,
            "peak_mb": _round(self.peak_mb),
            "baseline_mb": _round(self.baseline_mb),
            "added_mb": _round(self.added_mb),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
