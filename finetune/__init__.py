"""Evaluation and finetuning of pretrained encoders; imports `pretrain`, never the reverse."""
