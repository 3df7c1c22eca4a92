"""Run by torchrun in tests: one SGD step of the mlm objective on a fixed global batch of
BERT-corrupted captions, in float64, this process taking its slice; rank 0 saves the mean of the
process losses, the DDP-averaged gradients, the parameters after the step, and how many
positions each process had to predict.

usage: mlm_worker.py OUT_FILE NORMALISATION
  global: the objective's loss (normalised by the chosen positions of the whole global batch)
  local:  each process's own mean over its chosen positions (the wrong one; must not match)
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.data.transforms import IGNORE_INDEX, bert_mask
from pretrain.objectives import build_objective

GLOBAL_BATCH = 8
CAPTIONS = [
    "a small red triangle at the top left on a striped background",
    "a ring",
    "a large cyan ring in the center on a dotted background",
    "a medium blue square at the bottom",
    "a cross",
    "a small green diamond at the right on a plain background",
    "a yellow circle",
    "a large magenta cross at the bottom right on a checkered background",
]


def fixed_global_batch(model) -> dict:
    tok = model.tokenizer
    tokens = tok(CAPTIONS)  # [8, T]
    inputs, targets = bert_mask(
        tokens,
        mask_id=tok.mask_id,
        end_id=tok.end_id,
        special_ids=(tok.start_id, tok.end_id),
        random_ids=(1, tok.start_id),
        choose=0.35,
        generator=torch.Generator().manual_seed(3),
    )
    return {"text": inputs, "text_targets": targets}


def local_mean_loss(model, batch) -> torch.Tensor:
    chosen = batch["text_targets"] != IGNORE_INDEX
    logits = model.predict(batch["text"], chosen)
    return F.cross_entropy(logits, batch["text_targets"][chosen])


def main() -> None:
    out_file, normalisation = sys.argv[1:3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_default_dtype(torch.float64)
    overrides = ["objective.name=mlm", "mlm.context_length=16", "mlm.width=16", "mlm.layers=2"]
    config = load_config(None, [*overrides, "mlm.heads=2"])
    torch.manual_seed(0)
    objective, _ = build_objective(config)
    batch = fixed_global_batch(objective)
    share = GLOBAL_BATCH // world
    local = {key: value[rank * share : (rank + 1) * share] for key, value in batch.items()}
    model = torch.nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.5)
    if normalisation == "global":
        loss = model(local)["loss"]
    else:  # DDP's forward hooks are skipped here, so average the gradients by hand below
        loss = local_mean_loss(objective, local)
    loss.backward()  # DDP averages the gradients over processes
    if normalisation != "global" and world > 1:
        for parameter in objective.parameters():
            if parameter.grad is None:
                continue
            dist.all_reduce(parameter.grad)
            parameter.grad /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    gradients = {
        key: p.grad.clone() for key, p in objective.named_parameters() if p.grad is not None
    }
    optimizer.step()
    if rank == 0:
        chosen = (batch["text_targets"] != IGNORE_INDEX).sum(dim=1)  # [8] per caption
        per_process = [int(part.sum()) for part in chosen.split(share)]
        parameters = {key: value.detach().clone() for key, value in objective.named_parameters()}
        torch.save(
            {
                "loss": mean_loss,
                "grads": gradients,
                "params": parameters,
                "chosen_per_process": per_process,
            },
            out_file,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
