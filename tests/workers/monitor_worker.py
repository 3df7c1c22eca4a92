"""Launched by tests on 1 or 2 processes: the online kNN monitor of a fixed float64 encoder.

argv: OUT_DIR VAL_SHARDS [config overrides]. Each process writes rank<r>.pt with the gathered
features (key order) and the kNN top-1.
"""

import sys
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.distributed import make_accelerator
from pretrain.models.encoder import encoder_from_config
from pretrain.monitor import OnlineKnn

if __name__ == "__main__":
    out, shards, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    config = load_config(None, [f"data.val_shards={shards}", "monitor.every=1", *overrides])
    accelerator = make_accelerator("no", None)
    torch.manual_seed(0)  # the same weights on every process
    encoder, _ = encoder_from_config(config)
    encoder = encoder.double().to(accelerator.device)
    monitor = OnlineKnn.start(config, accelerator, [], encoder)
    features = monitor.features(encoder)
    result = {"features": features, "top1": monitor.evaluate(encoder), "labels": monitor.labels}
    torch.save(result, out / f"rank{accelerator.process_index}.pt")
