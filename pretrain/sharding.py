"""FSDP2: parameters, gradients and optimizer state sharded over the processes, and the
full-state gather that keeps checkpoints, pictures and the export what they are without it.

Two ways in, one layout (every timm `Block` of the encoder and the MAE decoder its own FSDP unit,
everything else in the root unit):

- GPUs: accelerate's FSDP plugin. An accelerate launch with an FSDP config
  (launch/accelerate_fsdp_vit_large.yaml) brings its own; `train.fsdp=true` under any other
  launcher hands accelerate one with the same settings (`accelerate_plugin`). Then
  accelerator.prepare shards the model (and wraps the blocks for activation checkpointing when
  the plugin says so) and moves the optimizers onto the sharded parameters.
- CPU (gloo): accelerate turns FSDP on for GPU process groups only, so `prepare` here calls
  torch's fully_shard itself, with the settings of the FSDP config when launched with one (the
  shipped recipe runs here too) or the defaults with `train.fsdp=true`.

Checkpoints are those of an unsharded run: on save every rank takes part in a full-state gather
(torch.distributed.checkpoint.state_dict with full_state_dict and cpu_offload: the whole state on
the main process's CPU), and the main process writes the same model.safetensors and optimizer.pt
(state numbered in optimizer order, as Optimizer.state_dict) as DDP; on load every rank reads the
files and keeps its own shards. So a sharded run resumes unsharded and back, on any number of
processes. With one process there is nothing to shard: the run is unsharded.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from accelerate.utils import DistributedType

# timm's transformer block (vision_transformer.Block): ViT encoders and the MAE decoder.
WRAP_CLASSES = ("Block",)
# What wrappers add to parameter names: activation checkpointing's, torch.compile's.
_NAME_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass(frozen=True)
class FSDPSettings:
    wrap_classes: tuple[str, ...] = WRAP_CLASSES  # class names that get their own FSDP unit
    reshard_after_forward: bool = True  # free gathered parameters after each unit's forward
    activation_checkpointing: bool = False  # recompute each unit's activations in backward


def launched_with_fsdp() -> bool:
    """Whether an accelerate launch with an FSDP config started this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def accelerate_plugin(requested: bool):
    """The FSDP2 plugin for Accelerator(fsdp_plugin=...) when train.fsdp asks for FSDP on GPUs
    and the launcher did not bring an FSDP config (None otherwise: accelerate reads the launch's
    own config, and on CPU `prepare` shards without accelerate)."""
    if not requested or launched_with_fsdp() or not torch.cuda.is_available():
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    settings = FSDPSettings()
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(settings.wrap_classes),
        reshard_after_forward=settings.reshard_after_forward,
        activation_checkpointing=settings.activation_checkpointing,
        state_dict_type="FULL_STATE_DICT",
    )


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def canonical_name(name: str) -> str:
    """A parameter's name without what wrappers insert: the name in the unsharded model."""
    for prefix in _NAME_PREFIXES:
        name = name.replace(prefix, "")
    return name


# --- preparing -----------------------------------------------------------------------------------


def prepare(accelerator, objective: nn.Module, optimizers: list, phases: dict, fsdp: bool):
    """accelerator.prepare of the objective and its optimizers, sharded when `fsdp` (or the
    launch) asks for it and there is more than one process.

    Returns (model, optimizers, phases): the model to call (DDP-wrapped, sharded or as is), the
    prepared optimizers, and `phases` ({phase: [(name, parameter)]}) bound to the parameters the
    optimizers now hold (sharding replaces every parameter).
    """
    if accelerator.distributed_type == DistributedType.FSDP:  # accelerate shards (GPUs)
        model, *optimizers = accelerator.prepare(objective, *optimizers)
        return model, optimizers, _rebind(phases, model)
    if (fsdp or launched_with_fsdp()) and accelerator.num_processes > 1:
        settings = settings_of_launch() if launched_with_fsdp() else FSDPSettings()
        names = {id(p): name for named in phases.values() for name, p in named}
        shard_with_torch(objective, accelerator.device, accelerator.num_processes, settings)
        phases = _rebind(phases, objective)
        current = dict(pair for named in phases.values() for pair in named)
        for optimizer in optimizers:  # still stateless: point them at the sharded parameters
            for group in optimizer.param_groups:
                group["params"] = [current[names[id(old)]] for old in group["params"]]
        prepared = accelerator.prepare(*optimizers)
        optimizers = list(prepared) if isinstance(prepared, tuple) else [prepared]
        return objective, optimizers, phases
    model, *optimizers = accelerator.prepare(objective, *optimizers)
    return model, optimizers, phases


def settings_of_launch() -> FSDPSettings:
    """The FSDP settings of the accelerate config this process was launched with."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    return FSDPSettings(
        wrap_classes=tuple(plugin.transformer_cls_names_to_wrap or WRAP_CLASSES),
        reshard_after_forward=bool(plugin.reshard_after_forward),
        activation_checkpointing=bool(plugin.activation_checkpointing),
    )


def shard_with_torch(objective: nn.Module, device, processes: int, settings: FSDPSettings):
    """torch's fully_shard in place: each module whose class is in settings.wrap_classes (wrapped
    for activation checkpointing first, if asked) becomes an FSDP unit, then the root."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (processes,))
    units = [
        (name, module)
        for name, module in objective.named_modules()
        if type(module).__name__ in settings.wrap_classes
    ]
    for name, module in units:
        if settings.activation_checkpointing:
            # torch.utils.checkpoint keeps the RNG state: recomputed dropout draws the same masks
            module = checkpoint_wrapper(module)
            objective.set_submodule(name, module)
        fully_shard(module, mesh=mesh, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(objective, mesh=mesh)


def _rebind(phases: dict, model: nn.Module) -> dict:
    """phases with each parameter replaced by the model's current one of the same name."""
    current = {canonical_name(name): p for name, p in model.named_parameters()}
    return {phase: [(name, current[name]) for name, _ in named] for phase, named in phases.items()}


# --- the full state: checkpoints, export -----------------------------------------------------


def _full_state_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def model_state(objective: nn.Module) -> dict:
    """The whole objective's state dict, on every rank when unsharded; when sharded, gathered
    to the main process's CPU (every rank must call this; the others get an empty dict)."""
    if not is_sharded(objective):
        return objective.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(objective, options=_full_state_options(cpu_offload=True))


def optimizer_state(objective: nn.Module, optimizer) -> dict:
    """optimizer.state_dict(), or its full-state gather when sharded (every rank calls; the main
    process gets it, the others an empty dict), numbered as Optimizer.state_dict numbers it."""
    if not is_sharded(objective):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds it
    gathered = get_optimizer_state_dict(
        objective, inner, options=_full_state_options(cpu_offload=True)
    )
    return _numbered(gathered) if gathered else {}


def load_state(objective, optimizers, phases: dict, model_saved: dict, optimizers_saved: dict):
    """A checkpoint's full state into the (possibly sharded) objective and its optimizers;
    optimizers_saved is {phase: state dict numbered as Optimizer.state_dict}."""
    optimizers_saved = {
        phase: _fit_to_parameters(optimizers_saved[phase], optimizer)
        for phase, optimizer in zip(phases, optimizers)
    }
    if not is_sharded(objective):
        objective.load_state_dict(model_saved)
        for phase, optimizer in zip(phases, optimizers):
            optimizer.load_state_dict(optimizers_saved[phase])
        return
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # Every rank passes the whole state and keeps its own shards of it. (Copies: the setters
    # replace the values of the dicts they are given with those shards.)
    set_model_state_dict(objective, dict(model_saved), options=_full_state_options())
    for (phase, named), optimizer in zip(phases.items(), optimizers):
        inner = getattr(optimizer, "optimizer", optimizer)
        names = {id(parameter): name for name, parameter in named}
        order = [names[id(p)] for group in inner.param_groups for p in group["params"]]
        state = _named(optimizers_saved[phase], order)  # new dicts, the same tensors
        set_optimizer_state_dict(objective, inner, state, options=_full_state_options())


def submodule_state(state: dict, name: str) -> dict:
    """The part of a model's state dict under submodule `name`, keyed as in the submodule's own
    state dict (the encoder's for the export)."""
    prefix = f"{name}."
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _fit_to_parameters(saved: dict, optimizer) -> dict:
    """A numbered optimizer state whose tensors take their parameter's (global) shape where
    only the shape changed, e.g. () saved for a scalar that is (1,) now because FSDP cannot
    shard 0-dim parameters; counters (AdamW's 0-dim `step`) keep theirs."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    fitted = {}
    for number, per_parameter in saved["state"].items():
        shape = parameters[number].shape
        fitted[number] = {
            key: value.reshape(shape)
            if isinstance(value, torch.Tensor)
            and key != "step"
            and value.shape != shape
            and value.numel() == shape.numel()
            else value
            for key, value in per_parameter.items()
        }
    return {**saved, "state": fitted}


def _numbered(state: dict) -> dict:
    """{"state": {name: ...}, "param_groups": [{"params": [name, ...]}]} -> the same numbered
    0, 1, ... in group order, the layout of Optimizer.state_dict (and of DDP checkpoints)."""
    number: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [number.setdefault(name, len(number)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {number[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _named(state: dict, order: list[str]) -> dict:
    """The inverse of _numbered: parameter number i is order[i]."""
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    named = {order[i]: dict(per_parameter) for i, per_parameter in state["state"].items()}
    return {"state": named, "param_groups": groups}


# --- the step --------------------------------------------------------------------------------


@contextlib.contextmanager
def no_gradient_sync(accelerator, model: nn.Module):
    """accelerator.no_sync (gradients accumulate locally, reduced on the last micro-batch), also
    for models sharded by shard_with_torch, which accelerate does not know about."""
    if not is_sharded(model):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(accelerator, optimizer, parameters: list, max_norm: float) -> torch.Tensor:
    """accelerator.clip_grad_norm_ (fp16 gradients unscaled first), returning the plain global
    norm. Under accelerate's FSDP, accelerate's own only clips a list that is the whole model's
    parameters and otherwise unscales twice (an error with fp16); a phase's list, or one without
    frozen parameters (MAE's fixed positions), is unscaled once here and clipped by torch, whose
    norm over sharded gradients is a DTensor."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return replicated(accelerator.clip_grad_norm_(parameters, max_norm))
    accelerator.unscale_gradients(optimizer)
    return replicated(torch.nn.utils.clip_grad_norm_(parameters, max_norm))


def replicated(value: torch.Tensor) -> torch.Tensor:
    """A DTensor result (the gradient norm over sharded gradients) as the plain global value."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


# --- the whole model for a moment: pictures ------------------------------------------------------


@contextlib.contextmanager
def whole_parameters(model: nn.Module):
    """The root unit's parameters gathered for calls that bypass the model's forward (pictures:
    `visualize`); the block units gather their own when called. Every rank must enter it and
    make the same calls inside. A no-op for unsharded models."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def local_bytes(model: nn.Module, optimizers: list) -> dict[str, int]:
    """Bytes of parameters and optimizer state held by this process (its shards when sharded)."""

    def held(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.numel() * local.element_size()

    parameters = sum(held(p) for p in model.parameters())
    state = sum(
        held(value)
        for optimizer in optimizers
        for per_parameter in optimizer.state.values()
        for value in per_parameter.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )
    return {"parameters": parameters, "optimizer": state}
