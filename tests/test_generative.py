"""Autoencoder, VAE and GAN: the VAE's KL and reparameterisation, the GAN's losses and phases,
smoke runs through the real CLI, exact GAN resume, and a 2-process GAN run."""

import json
import math

import pytest
import timm
import torch
from helpers import train_on_two_ranks
from safetensors.torch import load_file

from pretrain.__main__ import main as pretrain_main
from pretrain.checkpoint import list_checkpoints, load_checkpoint
from pretrain.config import load_config
from pretrain.models.dcgan import DCGANEncoder
from pretrain.objectives import build_objective
from pretrain.objectives.gan import discriminator_loss, generator_loss, mean_pairwise_distance
from pretrain.objectives.vae import kl_to_standard_normal, reparameterize
from pretrain.optim import build_optimizer, no_weight_decay_names, optimizer_phases

DCGAN_ENCODER = ["model.name=dcgan_encoder", "model.kwargs={width: 8, depth: 3}"]
TINY_PARTS = [
    "autoencoder.latent_dim=16",
    "autoencoder.decoder_width=8",
    "vae.latent_dim=8",
    "vae.decoder_width=8",
    "vae.sample_grid=4",
    "vae.traversal_dims=3",
    "gan.noise_dim=16",
    "gan.generator_width=8",
    "gan.sample_grid=4",
]


@pytest.fixture
def generative_run(demo_dir, tmp_path):
    """Overrides for a few-second run of any of the three on the demo data."""
    return [
        f"data.demo_dir={demo_dir}",
        "data.demo_train_samples=256",
        "data.demo_val_samples=64",
        "data.batch_size=8",
        "data.num_workers=1",
        "data.shuffle_buffer=64",
        "data.steps_per_epoch=4",
        *TINY_PARTS,
        "train.steps=4",
        "train.checkpoint_every=2",
        "schedule.warmup_steps=1",
        "logging.log_every=2",
        "logging.image_every=2",
        "logging.wandb=false",
        f"train.output_dir={tmp_path / 'runs'}",
    ]


def tiny(objective: str, *overrides: str):
    torch.manual_seed(0)
    model, _ = build_objective(
        load_config(None, [f"objective.name={objective}", *DCGAN_ENCODER, *TINY_PARTS, *overrides])
    )
    return model


def images(count: int = 8, seed: int = 1) -> dict:
    return {"image": torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


# --- VAE ------------------------------------------------------------------------------------------


def test_kl_closed_form_matches_a_monte_carlo_estimate():
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    logvar = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    sigma = (0.5 * logvar).exp()
    # KL(q || p) = E_q[log q(z) - log p(z)], estimated from 200k draws z ~ q per sample.
    z = mu + sigma * torch.randn(200_000, 3, 5, generator=generator, dtype=torch.float64)
    log_q = torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)  # [N, 3]
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_ratio = log_q - log_p
    estimate, standard_error = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(len(z))
    closed_form = kl_to_standard_normal(mu, logvar)  # [3]
    assert closed_form.shape == (3,)
    assert torch.all((closed_form - estimate).abs() < 4 * standard_error), (closed_form, estimate)
    # and torch's own closed form agrees
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)
    ).sum(-1)
    assert torch.allclose(closed_form, reference)


def test_gradients_reach_mu_and_sigma_through_the_reparameterisation():
    mu = torch.tensor([[0.5, -1.0]], requires_grad=True)
    logvar = torch.tensor([[0.2, -0.4]], requires_grad=True)
    torch.manual_seed(3)
    z = reparameterize(mu, logvar)
    (z**2).sum().backward()
    sigma = (0.5 * logvar).exp().detach()
    eps = (z.detach() - mu.detach()) / sigma
    # d(z^2)/dmu = 2z ; d(z^2)/dlogvar = 2z * eps * sigma / 2
    assert torch.allclose(mu.grad, 2 * z.detach())
    assert torch.allclose(logvar.grad, z.detach() * eps * sigma)
    assert logvar.grad.abs().min() > 0


def test_vae_loss_trains_both_moments_and_warms_beta_up_in_optimizer_steps():
    model = tiny("vae", "vae.kl_warmup_steps=4", "vae.beta=2.0", "train.grad_accum=2")
    model.train()
    outputs = model(images())
    outputs["loss"].backward()
    weight = model.to_moments.linear.weight.grad  # rows [0, D): mu, [D, 2D): log-variance
    assert weight[:8].abs().sum() > 0 and weight[8:].abs().sum() > 0
    assert all(p.grad is not None for p in model.encoder.parameters())
    # beta: 0 at the start, then +beta/4 per optimizer step of 2 micro-batches
    assert float(outputs["beta"]) == 0.0
    for _ in range(3):
        model(images())
    assert model.current_beta() == pytest.approx(2.0 * 2 / 4)
    model.eval()
    model(images())  # evaluation passes are not training steps
    assert model.current_beta() == pytest.approx(1.0)
    resumed = tiny("vae", "vae.kl_warmup_steps=4", "vae.beta=2.0", "train.grad_accum=2")
    resumed.load_state_dict(model.state_dict())
    assert resumed.current_beta() == pytest.approx(1.0)
    for _ in range(8):
        resumed.train()(images())
    assert resumed.current_beta() == pytest.approx(2.0)  # capped at vae.beta


def test_vae_pictures_traverse_one_latent_dimension_per_row():
    model = tiny("vae").eval()
    pictures = model.visualize(images())
    assert pictures["prior_samples"].shape == (4, 4, 3, 32, 32)
    assert pictures["traversal"].shape == (3, 4, 3, 32, 32)
    assert pictures["reconstruction"].shape == (8, 2, 3, 32, 32)
    # Within a row only the swept dimension changes, so the columns differ; rows differ too.
    row = pictures["traversal"][0]
    assert (row[0] - row[-1]).abs().max() > 0
    assert (pictures["traversal"][0] - pictures["traversal"][1]).abs().max() > 0


# --- GAN ------------------------------------------------------------------------------------------


def test_gan_losses_match_their_formulas():
    real, fake = torch.tensor([2.0, -0.5, 0.3]), torch.tensor([-1.0, 0.7, 0.1])
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    expected = -(d_real.log().mean() + (1 - d_fake).log().mean())
    assert torch.allclose(discriminator_loss(real, fake), expected)
    assert torch.allclose(generator_loss(fake, "non_saturating"), -d_fake.log().mean())
    assert torch.allclose(generator_loss(fake, "minimax"), (1 - d_fake).log().mean())


def test_mode_collapse_indicator_is_zero_for_a_collapsed_generator():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert mean_pairwise_distance(points) == pytest.approx((5 + 0 + 5) / 3)
    model = tiny("gan").train()
    healthy = model(images(), phase="discriminator")["sample_diversity"]
    last = model.generator.layers[-2]  # the RGB transposed convolution: zero it, keep its bias
    torch.nn.init.zeros_(last.weight)
    collapsed = model(images(), phase="discriminator")["sample_diversity"]
    assert healthy > 0.01 and collapsed == 0


def test_each_gan_phase_updates_only_its_own_parameters():
    """The engine's calls, one step: per phase forward(batch, phase) -> backward -> that phase's
    optimizer step -> zero all gradients (weight decay on, to catch decay applied by the wrong
    optimizer)."""
    model = tiny("gan", "optimizer.weight_decay=0.05").train()
    config = load_config(None, ["optimizer.weight_decay=0.05"])
    phases = optimizer_phases(model)
    assert list(phases) == ["discriminator", "generator"]
    owner = {name: phase for phase, named in phases.items() for name, _ in named}
    assert set(owner) == {name for name, _ in model.named_parameters()}  # a partition
    assert all(
        name.startswith("generator.") == (phase == "generator") for name, phase in owner.items()
    )
    skip = no_weight_decay_names(model)
    optimizers = {
        phase: build_optimizer(named, skip, config.optimizer, 1e-3)
        for phase, named in phases.items()
    }
    for phase, optimizer in optimizers.items():
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        outputs = model(images(), phase=phase)
        outputs["loss"].backward()
        if phase == "discriminator":  # fakes were made without gradient: none reaches G
            assert all(p.grad is None for _, p in phases["generator"])
        optimizer.step()
        model.zero_grad(set_to_none=True)
        for name, parameter in model.named_parameters():
            changed = not torch.equal(before[name], parameter)
            assert changed == (owner[name] == phase), (phase, name)


def test_gan_forward_without_a_phase_says_what_it_needs():
    with pytest.raises(ValueError, match="phase"):
        tiny("gan")(images())


# --- runs through the CLI ----------------------------------------------------------------------


def run_cli(args, capsys):
    code = pretrain_main(args)
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines()


@pytest.mark.parametrize(
    "objective, model, pictures, metrics",
    [
        ("autoencoder", "dcgan_encoder", ["reconstruction"], set()),
        ("autoencoder", "test_resnet", ["reconstruction"], set()),
        ("vae", "dcgan_encoder", ["prior_samples", "reconstruction", "traversal"], {"kl", "beta"}),
        (
            "gan",
            "dcgan_encoder",
            ["samples"],
            {"d_real", "d_fake", "d_fake_after_d_step", "sample_diversity", "loss_generator"},
        ),
    ],
)
def test_cli_smoke_run(generative_run, tmp_path, capsys, objective, model, pictures, metrics):
    encoder = DCGAN_ENCODER if model == "dcgan_encoder" else [f"model.name={model}"]
    overrides = [f"objective.name={objective}", *encoder, "train.run_name=smoke"]
    code, out = run_cli([*generative_run, *overrides], capsys)
    assert code == 0
    summary = json.loads(out[-1])
    run_dir = tmp_path / "runs" / "smoke"
    assert summary["objective"] == objective and summary["steps"] == 4
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert metrics | {"loss"} <= set(lines[-1]) and math.isfinite(lines[-1]["loss"])
    written = sorted(path.name for path in (run_dir / "images").iterdir())
    assert written == [f"{name}_step{step:07d}.png" for name in pictures for step in (2, 4)]
    card = json.loads((run_dir / "export" / "encoder.json").read_text())
    encoder = timm.create_model(card["timm_name"], **card["timm_kwargs"])
    encoder.load_state_dict(load_file(run_dir / "export" / "encoder.safetensors"), strict=True)
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, encoder.num_features)
    assert isinstance(encoder, DCGANEncoder) == (model == "dcgan_encoder")


def test_gan_resumes_exactly_with_its_fixed_noise(generative_run, tmp_path, capsys):
    gan = [*generative_run, *DCGAN_ENCODER, "objective.name=gan"]
    assert run_cli([*gan, "train.run_name=straight"], capsys)[0] == 0
    assert run_cli([*gan, "train.run_name=broken"], capsys)[0] == 0
    broken = tmp_path / "runs" / "broken"
    # Simulate a crash right after the step-2 checkpoint: the later state never happened.
    for later in list_checkpoints(broken)[1:]:
        for path in later.iterdir():
            path.unlink()
        later.rmdir()
    code, out = run_cli(["--resume", str(broken)], capsys)
    assert code == 0 and json.loads(out[-1])["steps"] == 4
    straight = load_checkpoint(list_checkpoints(tmp_path / "runs" / "straight")[-1])
    resumed = load_checkpoint(list_checkpoints(broken)[-1])
    assert "fixed_noise" in resumed[0] and set(resumed[1]) == {"discriminator", "generator"}
    for name, tensor in straight[0].items():
        assert torch.equal(tensor, resumed[0][name]), name


@pytest.mark.distributed
def test_two_gloo_processes_keep_gan_replicas_identical(generative_run, tmp_path):
    overrides = [*generative_run, *DCGAN_ENCODER, "objective.name=gan", "train.run_name=ddp"]
    rank0, rank1, output = train_on_two_ranks(tmp_path, overrides)
    assert "2 process(es)" in output
    parameter_names = {name for name, _ in tiny("gan").named_parameters()}
    assert parameter_names < set(rank0)
    for name in parameter_names | {"fixed_noise"}:
        assert torch.equal(rank0[name], rank1[name]), name
    # BatchNorm running statistics are the exception: DDP broadcasts rank 0's at the start of
    # every forward, and each rank then updates them with its own batch, so after the last
    # forward they differ. The export and checkpoints take rank 0's.
    metrics = (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 4


@pytest.mark.parametrize(
    "override, fragment",
    [
        (
            "gan.generator_loss=wasserstein",
            "config key 'gan.generator_loss' must be one of non_saturating, minimax",
        ),
        ("data.image_size=48", "power of two"),
    ],
)
def test_bad_settings_fail_in_one_line_without_a_run_dir(
    generative_run, tmp_path, capsys, override, fragment
):
    code = pretrain_main([*generative_run, *DCGAN_ENCODER, "objective.name=gan", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "runs").exists()
