import pytest

from pretrain.__main__ import main as pretrain_main
from pretrain.config import Config, ConfigError, load_config, to_dict


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 7\nmodel:\n  kwargs: {depth: 2}\n")
    config = load_config(
        path, ["optimizer.blr=1e-3", "train.clip_grad=1", "optimizer.betas=[0.8,0.9]"]
    )
    assert config.train.steps == 7
    assert config.model.kwargs == {"depth": 2}
    assert config.optimizer.blr == pytest.approx(1e-3)
    assert config.train.clip_grad == 1.0 and isinstance(config.train.clip_grad, float)
    assert config.optimizer.betas == (0.8, 0.9)
    assert config.data.batch_size == Config().data.batch_size  # untouched default
    assert to_dict(config)["optimizer"]["betas"] == [0.8, 0.9]


def test_nested_kwargs_override_merges():
    config = load_config(None, ["model.kwargs.depth=3", "model.kwargs.embed_dim=64"])
    assert config.model.kwargs == {"depth": 3, "embed_dim": 64}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.stpes=3", "unknown config key 'train.stpes'"),
        ("trian.steps=3", "unknown config key 'trian'"),
        ("train.steps=abc", "config key 'train.steps' needs int"),
        ("train.steps=1.5", "config key 'train.steps' needs int"),
        ("logging.wandb=maybe", "config key 'logging.wandb' needs bool"),
        ("optimizer.betas=[0.9]", "config key 'optimizer.betas' needs a list of 2 values"),
        ("train=3", "config key 'train' is a section"),
        ("steps", "is not of the form section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.batch_sise'"):
        load_config(typo)
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_cli_reports_a_typo_in_one_line_and_creates_nothing(tmp_path, capsys):
    code = pretrain_main([f"train.output_dir={tmp_path}", "train.stesp=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith("error: unknown config key 'train.stesp' (known in this section: ")
    assert "steps, grad_accum" in err[0]
    assert list(tmp_path.iterdir()) == []
