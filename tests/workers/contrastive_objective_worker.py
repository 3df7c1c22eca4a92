"""Run by torchrun in tests: one SGD step of a SimCLR or CLIP objective on a fixed global batch,
in float64, with this process taking its slice; rank 0 saves the mean loss, the DDP-averaged
gradients and the parameters after the step.

usage: contrastive_objective_worker.py OUT_FILE OBJECTIVE NEGATIVES
"""

import sys

import torch
import torch.distributed as dist

from pretrain.config import load_config
from pretrain.objectives import build_objective

GLOBAL_BATCH = 8


def fixed_global_batch(objective) -> dict:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator, dtype=torch.float64)
    batch = {"image": images}
    if hasattr(objective, "tokenize"):
        words = ["red", "green", "blue", "circle", "square", "small", "large", "left"]
        captions = [f"a {words[i]} {words[(3 * i + 1) % 8]} shape" for i in range(GLOBAL_BATCH)]
        batch["text"] = objective.tokenize(captions)
    else:
        batch["image2"] = torch.randn(images.shape, generator=generator, dtype=torch.float64)
    return batch


def main() -> None:
    out_file, name, negatives = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_default_dtype(torch.float64)
    # ViT towers (LayerNorm only) and a projection without BatchNorm: nothing couples the
    # samples of a batch except the loss, so W processes must equal one process exactly.
    config = load_config(
        None,
        [
            f"objective.name={name}",
            "data.image_size=16",
            "model.patch_size=8",
            "model.kwargs={depth: 1, embed_dim: 16, num_heads: 2}",
            "simclr.projection_layers=1",
            "simclr.projection_dim=8",
            f"simclr.negatives={negatives}",
            f"clip.negatives={negatives}",
            "clip.embed_dim=8",
            "clip.context_length=8",
            "clip.text_width=16",
            "clip.text_layers=1",
            "clip.text_heads=2",
        ],
    )
    torch.manual_seed(0)
    objective, _ = build_objective(config)
    batch = fixed_global_batch(objective)
    share = GLOBAL_BATCH // world
    local = {key: value[rank * share : (rank + 1) * share] for key, value in batch.items()}
    model = torch.nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.5)
    loss = model(local)["loss"]
    loss.backward()  # DDP averages the gradients over processes
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    gradients = {
        key: parameter.grad.clone()
        for key, parameter in objective.named_parameters()
        if parameter.grad is not None
    }
    optimizer.step()
    if rank == 0:
        parameters = {key: value.detach().clone() for key, value in objective.named_parameters()}
        torch.save({"loss": mean_loss, "grads": gradients, "params": parameters}, out_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
