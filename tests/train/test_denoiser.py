"""The Denoiser adapter: loss, sampling with each solver, the diffusers export."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline

from privdiff.train.denoiser import SOLVERS, Denoiser, build_scheduler, build_unet


def tiny(num_classes: int | None = None) -> Denoiser:
    torch.manual_seed(0)
    unet = build_unet(8, 1, block_out_channels=(8, 16), attention_levels=(1,), num_classes=num_classes)
    return Denoiser(unet, build_scheduler(100))


def test_per_sample_loss_is_the_simple_ddpm_loss() -> None:
    model = tiny()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 50, 99])
    loss = model.per_sample_loss(x0, timesteps=t, noise=noise)
    abar = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    expected = (model.unet(x_t, t).sample - noise).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected)
    assert loss.shape == (4,)


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_samples_in_range_and_is_seeded(solver: str) -> None:
    model = tiny()
    a = model.sample_batch(3, solver, 5, generator=torch.Generator().manual_seed(1))
    b = model.sample_batch(3, solver, 5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b)


def test_conditional_model_needs_labels() -> None:
    model = tiny(num_classes=3)
    with pytest.raises(ValueError, match="class-conditional"):
        model.per_sample_loss(torch.zeros(2, 1, 8, 8))
    assert model.sample_batch(2, "ddim", 3, class_labels=torch.tensor([0, 2])).shape == (2, 1, 8, 8)


def test_export_loads_in_ddpm_pipeline_and_round_trips(tmp_path) -> None:
    model = tiny()
    model.save_pretrained(tmp_path / "model")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "model")
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    loaded = Denoiser.from_pretrained(tmp_path / "model")
    for (name, p), q in zip(model.unet.named_parameters(), loaded.unet.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_from_pretrained_names_a_folder_that_is_not_a_model(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        Denoiser.from_pretrained(tmp_path)


def test_unet_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="attention_levels"):
        build_unet(8, 1, block_out_channels=(8, 16), attention_levels=(2,))
    with pytest.raises(ValueError, match="beta_schedule"):
        build_scheduler(10, "sigmoid")
