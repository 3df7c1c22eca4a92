"""Evaluation and finetuning of pretrained encoders; imports `pretrain`, never the reverse.

__main__   the `finetune linear|knn|full|zeroshot|mlm` command
config     settings (defaults, configs/finetune/*.yaml, flags, overrides)
job        what a mode runs on: settings, encoder source, shards, classes, output
encoder    find an export and its run; frozen, random-init or with a classifier head
data       which shards and class names a command uses
features   distributed one-pass feature extraction, gathered, key-sorted, cached; a job's
           frozen features (shared by linear, knn and zeroshot)
linear     linear probe (BatchNorm without affine + Linear, parallel learning rates) + its runner
knn        weighted kNN + its runner
full       full finetuning with layer-wise lr decay + its runner
zeroshot   CLIP zero-shot classification and image-text retrieval + its runner
mlm        masked-token accuracy of a masked-language run on held-out captions + its runner
metrics    top-k accuracy, confusion matrix and its picture
report     result JSON, confusion PNG and W&B
"""
