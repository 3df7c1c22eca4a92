"""Gradient accumulation that keeps every negative: K micro-batches of B give exactly the loss and
gradients of one batch of K x B (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup": GradCache).

Accumulating a contrastive loss micro-batch by micro-batch would score each sample against the
B - 1 others of its own micro-batch only: a different, weaker objective than the K x B batch that
the learning rate is scaled for. For an EmbeddingObjective (pretrain.objectives.registry) a step
instead runs

  1. every micro-batch's embeddings without a graph, noting the RNG state before each;
  2. the loss over all K x B of them (gathered across processes inside embedding_loss, with
     gradient), and its gradients with respect to every embedding;
  3. each micro-batch again, with its graph, from its noted RNG state (the same dropout and
     drop-path draws), and a backward of sum(embeddings * their cached gradients): by the chain
     rule the parameter gradients of the whole step's loss. DDP/FSDP reduce on the last one.

Memory: one micro-batch's activations plus the (K x B, D) embeddings (and the loss's own
(K x B) x (W x K x B) similarity matrix, as a K x B batch would have). Cost: one extra forward
per micro-batch.

BatchNorm: statistics are those of each micro-batch (over all processes with global BatchNorm),
in pass 1 and pass 3 alike, so the features of pass 3 are exactly those the loss was taken on.
"One batch of K x B" therefore means: K x B samples in one loss, normalised in K groups of B
(W x B with global BatchNorm), as when each micro-batch's graph were kept until one backward.
Running statistics are restored after pass 1, so they see each micro-batch once, as without
GradCache. Without BatchNorm (ViTs, CLIP) the step equals a plain K x B batch.

0-dim embeddings (a parameter the loss needs, e.g. CLIP's logit scale) are the same in every
micro-batch; their gradient is applied once, through the last micro-batch's pass.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from pretrain.sharding import no_gradient_sync


class GradCache:
    """An `accumulate` for pretrain.step.optimizer_step: the whole step's batch in one loss.

    objective: the unwrapped EmbeddingObjective (its embedding_loss); the model that
    optimizer_step hands over (DDP-wrapped, sharded or plain) is called with embed_only=True.
    """

    def __init__(self, objective: nn.Module):
        self.objective = objective

    def __call__(self, accelerator, model, micro_batches, forward, phase, on_outputs):
        device = accelerator.device
        # 1. embeddings of every micro-batch, no graph; buffers (BN running stats) put back
        buffers = [buffer.detach().clone() for buffer in model.buffers()]
        rng_states, cached = [], []
        with torch.no_grad():
            for batch in micro_batches:
                rng_states.append(_rng_state(device))
                cached.append(model(batch, embed_only=True))
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)

        # 2. the step's loss over all of them, and d loss / d embedding
        joined = _join(cached)  # {name: (K x B, ...) or 0-dim leaf that requires grad}
        outputs = self.objective.embedding_loss(joined)
        gradients = torch.autograd.grad(outputs["loss"], list(joined.values()), allow_unused=True)
        gradients = {
            name: torch.zeros_like(leaf) if grad is None else grad
            for (name, leaf), grad in zip(joined.items(), gradients)
        }

        # 3. each micro-batch with its graph; backward with its slice of the cached gradients
        start = 0
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            rows = next(t.shape[0] for t in cached[index].values() if t.dim() > 0)
            _set_rng_state(rng_states[index], device)
            with contextlib.nullcontext() if last else no_gradient_sync(accelerator, model):
                live = model(batch, embed_only=True)
                surrogate = sum(
                    (live[name] * gradient[start : start + rows]).sum()
                    if gradient.dim() > 0
                    else (live[name] * gradient if last else 0.0)  # shared: applied once
                    for name, gradient in gradients.items()
                )
                accelerator.backward(surrogate)
            start += rows
        if on_outputs is not None:
            for _ in micro_batches:
                on_outputs(outputs, phase)
        return outputs["loss"].detach().float()


def _join(cached: list[dict]) -> dict[str, torch.Tensor]:
    """Per-micro-batch embeddings -> leaves for the loss: per-sample tensors concatenated in
    micro-batch order, 0-dim values taken once (they are the same in every micro-batch)."""
    joined = {}
    for name, first in cached[0].items():
        value = first if first.dim() == 0 else torch.cat([part[name] for part in cached])
        # the loss in at least fp32, as under autocast
        precision = torch.promote_types(value.dtype, torch.float32)
        joined[name] = value.detach().to(precision).requires_grad_()
    return joined


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
