"""Evaluation and finetuning of pretrained encoders; imports `pretrain`, never the reverse.

__main__   the `finetune linear|knn|full|zeroshot` command
config     settings (defaults, configs/finetune/*.yaml, flags, overrides)
encoder    find an export and its run; frozen, random-init or with a classifier head
data       which shards and class names a command uses
features   distributed one-pass feature extraction, gathered, key-sorted, cached
linear     linear probe (BatchNorm without affine + Linear, parallel learning rates)
knn        weighted kNN
full       full finetuning with layer-wise lr decay
zeroshot   CLIP zero-shot classification and image-text retrieval
metrics    top-k accuracy, confusion matrix and its picture
report     result JSON, confusion PNG and W&B
"""
