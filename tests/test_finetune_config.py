from pathlib import Path

import pytest

from finetune.config import load_finetune_config
from pretrain.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "finetune").glob("*.yaml")))
def test_every_shipped_finetune_config_loads(path):
    load_finetune_config(path)


def test_yaml_then_flags_then_overrides(tmp_path):
    path = tmp_path / "probe.yaml"
    path.write_text("linear: {epochs: 7, batch_size: 32}\ndata: {pool: cls}\n")
    config = load_finetune_config(
        path, {"linear.epochs": 9, "data.pool": None}, ["linear.batch_size=16"]
    )
    assert config.linear.epochs == 9  # the flag beats the file
    assert config.data.pool == "cls"  # an absent flag (None) leaves the file's value
    assert config.linear.batch_size == 16  # an override beats both
    assert config.knn.k == 20 and config.knn.temperature == 0.07  # untouched defaults


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.pool=max", "config key 'data.pool' must be one of avg, cls"),
        ("knn.k=0", "knn.k must be at least 1"),
        ("linear.learning_rates=[0.1, -1]", "linear.learning_rates"),
        ("zeroshot.templates=['no placeholder']", "zeroshot.templates"),
        ("full.mixup=0.8", "even full.batch_size"),
        ("full.layer_decay=1.5", "full.layer_decay"),
        ("full.epochz=3", "unknown config key 'full.epochz'"),
    ],
)
def test_bad_settings_are_named_in_one_line(override, fragment):
    overrides = [override, "full.batch_size=7"] if "mixup" in override else [override]
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        load_finetune_config(None, overrides=overrides)
