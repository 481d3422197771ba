"""The pixel model (``PixelDiffusion``): loss, sampling with each solver, the diffusers export and reload."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline

from privdiff.model import Batch
from privdiff.train.denoiser import SOLVERS, build_scheduler, build_unet
from privdiff.train.models import load_model
from privdiff.train.pixel import PixelDiffusion


def tiny(num_classes: int | None = None) -> PixelDiffusion:
    torch.manual_seed(0)
    unet = build_unet(8, 1, block_out_channels=(8, 16), attention_levels=(1,), num_classes=num_classes)
    return PixelDiffusion.from_parts(unet, build_scheduler(100))


def batch(x01: torch.Tensor, cond=None) -> Batch:
    return Batch(x01, cond, torch.arange(len(x01)))


def test_per_example_loss_is_the_simple_ddpm_loss() -> None:
    model = tiny()
    x01 = torch.rand(4, 1, 8, 8)
    noise = torch.randn_like(x01)
    t = torch.tensor([0, 10, 50, 99])
    loss = model.per_example_loss(batch(x01), timesteps=t, noise=noise)
    abar = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = x01 * 2 - 1
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    expected = (model.trainable(x_t, t).sample - noise).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected)
    assert loss.shape == (4,)


def test_encode_and_decode_map_pixels_to_the_unit_scale_and_back() -> None:
    model = tiny()
    x01 = torch.arange(256).float().div(255).view(1, 1, 16, 16)
    assert torch.equal(model.encode(x01), x01.mul(255).div(127.5).sub(1))  # the same floats as u8 / 127.5 - 1
    torch.testing.assert_close(model.decode(model.encode(x01)), x01)


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_samples_in_range_and_is_seeded(solver: str) -> None:
    model = tiny()
    a = model.sample(3, solver, 5, generator=torch.Generator().manual_seed(1))
    b = model.sample(3, solver, 5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 8, 8) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)


def test_conditional_model_needs_labels() -> None:
    model = tiny(num_classes=3)
    with pytest.raises(ValueError, match="class-conditional"):
        model.per_example_loss(batch(torch.zeros(2, 1, 8, 8)))
    assert model.conditioning == "class" and tiny().conditioning is None
    assert model.sample(2, "ddim", 3, cond=torch.tensor([0, 2])).shape == (2, 1, 8, 8)


def test_export_loads_in_ddpm_pipeline_and_round_trips(tmp_path) -> None:
    model = tiny()
    model.save_pretrained(tmp_path / "model")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "model")
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    for loaded in (PixelDiffusion.from_pretrained(tmp_path / "model"), load_model(tmp_path / "model"),
                   PixelDiffusion(image_size=8, channels=1, pretrained=str(tmp_path / "model"))):
        for (name, p), q in zip(model.trainable.named_parameters(), loaded.trainable.parameters()):
            torch.testing.assert_close(p, q, msg=name)


def test_from_pretrained_names_a_folder_that_is_not_a_model_or_does_not_fit(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        PixelDiffusion.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        load_model(tmp_path)
    tiny().save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=r"makes \(1, 8, 8\) images but the data are \(1, 16, 16\).*data.image_size"):
        PixelDiffusion(image_size=16, channels=1, pretrained=str(tmp_path / "model"))


def test_unet_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="attention_levels"):
        build_unet(8, 1, block_out_channels=(8, 16), attention_levels=(2,))
    with pytest.raises(ValueError, match="beta_schedule"):
        build_scheduler(10, "sigmoid")


def test_the_unet_takes_its_group_norm_groups_and_attention_heads_from_the_model_settings() -> None:
    model = PixelDiffusion(image_size=8, block_out_channels=(32, 64), attention_levels=(1,), norm_num_groups=32,
                           attention_head_dim=16)
    norms = [m for m in model.trainable.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)
    heads = {m.heads for m in model.trainable.modules() if type(m).__name__ == "Attention"}
    assert heads == {64 // 16}
    with pytest.raises(ValueError, match="norm_num_groups=32"):
        PixelDiffusion(image_size=8, block_out_channels=(16, 32), norm_num_groups=32)
