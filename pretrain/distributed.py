"""Process-group facts and the few collectives the toolkit needs; nothing else calls them."""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, gather_object

from pretrain.errors import LaunchError


def make_accelerator(
    mixed_precision: str,
    log_with: str | None,
    find_unused_parameters: bool = False,
    fsdp_plugin=None,
) -> Accelerator:
    """An Accelerator that really spans the launcher's processes, on GPU or CPU.

    Without CUDA a plain Accelerator() under a multi-process launcher quietly starts N separate
    single-process runs; cpu=True makes it build a gloo group instead. The world-size check
    catches any other way of ending up there. `find_unused_parameters` is for models whose
    backward passes reach only part of the parameters (objectives with optimizer phases).
    `fsdp_plugin`: accelerate's FSDP plugin (pretrain.sharding.accelerate_plugin), or None.
    """
    has_cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if has_cuda and torch.cuda.is_bf16_supported() else "no"
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    accelerator = Accelerator(
        cpu=not has_cuda,
        mixed_precision=mixed_precision,
        log_with=log_with,
        kwargs_handlers=handlers if find_unused_parameters else None,
        fsdp_plugin=fsdp_plugin,
    )
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise LaunchError(
            f"launcher asked for {expected} processes but the process group has "
            f"{accelerator.num_processes}; check the accelerate/torchrun arguments"
        )
    return accelerator


def broadcast_from_main(accelerator: Accelerator, value):
    """The main process's `value` on every process (e.g. a run name made from the clock)."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def mean_across_processes(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(values, reduction="mean")


def sum_across_processes(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(values, reduction="sum")


def per_rank(accelerator: Accelerator, count: int) -> list[int]:
    """Every rank's `count` (e.g. skipped samples), on every rank: a summed one-hot vector."""
    counts = torch.zeros(accelerator.num_processes, dtype=torch.int64, device=accelerator.device)
    counts[accelerator.process_index] = count
    return sum_across_processes(accelerator, counts).tolist()


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
    """values summed over the default process group, detached (counts and sums that normalise a
    loss, e.g. the number of masked tokens in the global batch); values itself in one process."""
    _, world_size = world_info()
    if world_size == 1:
        return values.detach()
    total = values.detach().clone()
    dist.all_reduce(total)
    return total


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """x: (B, ...) on every process -> (W*B, ...) concatenated in rank order, with gradient.

    Contrastive losses score local rows against every process's rows, so each process's loss
    depends on the others' features. The backward therefore SUMS the incoming gradients over
    processes and hands each its own slice; DDP's gradient averaging then yields exactly the
    single-process gradient. (A plain dist.all_gather has no gradient; a backward that only
    keeps the local slice of the local gradient drops the other processes' terms.)
    Every process must pass the same shape: checked with one small all_gather of the shapes.
    """
    _, world_size = world_info()
    if world_size == 1:
        return x
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)  # (ndim,)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    if not bool((torch.stack(shapes) == shape).all()):  # one host sync per call
        listed = ", ".join(str(tuple(other.tolist())) for other in shapes)
        raise ValueError(f"gather_with_grad needs the same shape on every process, got {listed}")
    return torch.cat(_all_gather_with_grad(x))


def stack_with_grad(x: torch.Tensor) -> torch.Tensor:
    """x: (...) on every process -> (W, ...) stacked in rank order, with the same summing
    backward as gather_with_grad but no shape check: for callers whose shapes agree by
    construction (BatchNorm statistics of C channels), which cannot afford a host sync."""
    if world_info()[1] == 1:
        return x.unsqueeze(0)
    return torch.stack(_all_gather_with_grad(x))


def _all_gather_with_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """W tensors shaped like x, in rank order; the backward sums the gradients over processes."""
    # Imported here: torch.distributed.nn also pulls in the RPC machinery, needed only now.
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in recent torch in favour of a private functional collective; this one has
        # the summing backward on every backend (gloo included) and every supported torch.
        warnings.filterwarnings(
            "ignore", message=".*all_gather is deprecated", category=FutureWarning
        )
        return list(all_gather(x.contiguous()))


def gather_global_batch(*local: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Several (B, D_i) tensors of this process -> the global batch's (N, D_i), rank order, with
    gradient, through ONE gather (they travel side by side as (B, sum D_i)); and the offset of
    this process's rows among the N (rank * B)."""
    rank, _ = world_info()
    widths = [tensor.shape[1] for tensor in local]
    joined = gather_with_grad(torch.cat(local, dim=1))  # (N, sum D_i)
    return list(joined.split(widths, dim=1)), rank * local[0].shape[0]


def gather_objects(accelerator: Accelerator, value) -> list:
    """Every process's picklable `value`, in rank order, on every process."""
    if accelerator.num_processes == 1:
        return [value]
    return gather_object([value])


def gather_rows(
    accelerator: Accelerator, local: torch.Tensor, counts: list[int], block_rows: int = 16384
) -> torch.Tensor:
    """Every process's rows, concatenated in rank order, on every process, without padding.

    local: [counts[rank], ...] -> [sum(counts), ...] on the CPU. An all-gather needs equal
    shapes, so each round sends a zero-padded block of at most `block_rows` rows (bounding the
    device memory one round needs) and the padding is cut away again: no padded row survives.
    """
    if accelerator.num_processes == 1:
        return local
    longest = max(counts)
    pieces: list[list[torch.Tensor]] = [[] for _ in counts]
    for start in range(0, longest, block_rows):
        rows = min(block_rows, longest - start)
        block = local.new_zeros((rows, *local.shape[1:]))
        mine = local[start : start + rows]
        block[: len(mine)] = mine
        gathered = accelerator.gather(block.to(accelerator.device)).cpu()  # [world * rows, ...]
        for rank, count in enumerate(counts):
            valid = max(0, min(rows, count - start))
            pieces[rank].append(gathered[rank * rows : rank * rows + valid])
    return torch.cat([piece for rank_pieces in pieces for piece in rank_pieces])
