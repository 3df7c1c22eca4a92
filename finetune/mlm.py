"""`finetune mlm`: masked-token top-1 of an `mlm` run on held-out captions, beside a random-init
text encoder (--compare-random-init) and the best constant guess.

    val captions --BERT masking, seeded by (mlm.seed, sample key)--> corrupted ids [B, T] and
    targets --encoder + tied head (the run's last checkpoint)--> logits at the chosen
    positions [M, V] --summed over processes--> top-1, cross-entropy, perplexity

Every caption is masked the same way for the trained model, the random-init baseline and any
process count. By default each chosen token becomes the mask token (`mlm.corruption: mask`),
so every prediction comes from the context alone; `bert` applies the training rule (80/10/10),
where the 10% kept tokens are visible to the model. The constant baseline always predicts the
most frequent token among the chosen positions themselves: no constant guess does better there.
"""

from __future__ import annotations

import math
import sys

import torch
from tqdm import tqdm

from finetune.encoder import load_run_objective
from finetune.job import Job
from pretrain.data import count_samples, eval_loader
from pretrain.data.transforms import IGNORE_INDEX, MaskedCaption
from pretrain.distributed import sum_across_processes
from pretrain.errors import DataError
from pretrain.objectives.mlm import masked_token_sums, masking_settings


def evaluation_masking(run_settings, corruption: str) -> dict:
    """bert_mask's arguments: the run's choice probability; its 80/10/10 rule, or all masked."""
    masking = masking_settings(run_settings)
    if corruption == "mask":
        masking.update(to_mask=1.0, to_random=0.0)
    return masking


@torch.no_grad()
def masked_token_counts(model, loader, accelerator, progress) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over this process's captions: (sums [4] float64: cross-entropy, top-1 hits,
    chosen positions, captions; target counts [V] int64)."""
    device = accelerator.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    targets_seen = torch.zeros(model.tokenizer.vocab_size, dtype=torch.int64, device=device)
    for batch in loader:
        targets = batch["text_targets"].to(device)  # [B, T]
        chosen = targets != IGNORE_INDEX
        with accelerator.autocast():
            logits = model.predict(batch["text"].to(device), chosen).float()  # [M, V]
        wanted = targets[chosen]  # [M]
        summed, hits = masked_token_sums(logits, wanted)
        sums += sums.new_tensor([summed.item(), hits.item(), len(wanted), len(targets)])
        targets_seen += torch.bincount(wanted, minlength=len(targets_seen))
        progress.update(len(targets))
    return sums, targets_seen


def run_mlm(job: Job, random_init: bool) -> dict | None:
    """`finetune mlm`: the result (main process)."""
    data, settings, accelerator = job.config.data, job.config.mlm, job.accelerator
    model, run_config = load_run_objective(
        job.source.run_dir, "mlm", random_init, needed_by="finetune mlm"
    )
    model.to(accelerator.device)
    masking = evaluation_masking(run_config.mlm, settings.corruption)
    transform = MaskedCaption(model.tokenizer, masking, key_seed=settings.seed)
    rank, world = accelerator.process_index, accelerator.num_processes
    urls = job.val_urls
    loader = eval_loader(
        urls, transform, data.batch_size, rank, world, data.num_workers, data.allow_pipe
    )
    progress = tqdm(
        total=count_samples(urls[rank::world]) if urls[rank::world] else 0,
        desc="masked captions",
        unit="caption",
        disable=not accelerator.is_main_process,
        file=sys.stderr,
        leave=False,
    )
    sums, targets_seen = masked_token_counts(model, loader, accelerator, progress)
    progress.close()
    sums = sum_across_processes(accelerator, sums).cpu()
    targets_seen = sum_across_processes(accelerator, targets_seen).cpu()
    skipped = int(sum_across_processes(accelerator, torch.tensor(loader.skipped)))
    loss_sum, hits, chosen, captions = sums.tolist()
    if chosen == 0:
        raise DataError("the val shards hold no captions (txt) with maskable tokens")
    if not accelerator.is_main_process:
        return None
    most_frequent = int(targets_seen.argmax())
    loss = loss_sum / chosen
    result = {
        **job.describe(random_init),
        "top1": hits / chosen,
        "loss": loss,
        "perplexity": math.exp(loss),
        "most_frequent_token": model.tokenizer.tokenizer.decode([most_frequent]).strip(),
        "most_frequent_top1": int(targets_seen[most_frequent]) / chosen,
        "val_captions": int(captions),
        "masked_tokens": int(chosen),
        "corruption": settings.corruption,
        "masking": masking,
        "skipped_samples": skipped,
    }
    job.report(random_init).finish(result)
    return result
