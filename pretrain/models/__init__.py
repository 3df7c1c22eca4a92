from pretrain.models import dcgan  # noqa: F401  (registers dcgan_encoder with timm for any importer)
