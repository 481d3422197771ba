"""The cascaded pixel text-to-image model (Imagen / DeepFloyd IF): its two IF folders, per-example gradients through
both stages, training under DP-SGD from the YAML, and the audit of the saved folder."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from privdiff.cli import main, run_fit_cli
from privdiff.model import Batch
from privdiff.train.cascade import PixelCascade
from privdiff.train.models import load_model
from privdiff.train.pixel_text import PixelTextToImage

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TINY = dict(image_size=16, channels=1, block_out_channels=(8, 16), attention_head_dim=4, text_width=16, text_layers=1,
            sr_block_out_channels=(8, 16))
WIDTHS = ["--model.diffusion.init_args.block_out_channels", "[8, 16]", "--model.diffusion.init_args.sr_block_out_channels", "[8, 16]",
          "--model.diffusion.init_args.attention_head_dim", "4", "--model.diffusion.init_args.text_width", "16",
          "--model.diffusion.init_args.text_layers", "1"]
DATA = ["-c", "configs/base.yaml", "-c", "configs/data/captioned_digits.yaml", "--data.num_members", "16", "--data.num_heldout", "16",
        "--data.duplicate_images", "2", "--data.duplicate_copies", "3", "--data.batch_size", "4",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]


def tiny(seed: int = 0, **kwargs) -> PixelCascade:
    torch.manual_seed(seed)
    return PixelCascade(**{**TINY, **kwargs})


@pytest.fixture(scope="module")
def cascade_folder(tmp_path_factory) -> tuple[PixelCascade, Path]:
    model = tiny(seed=3)
    with torch.no_grad():  # conv_outs of random weights, not diffusers' zero init: the variance halves must stay apart
        for unet in (model.net.unet, model.net.sr_unet):
            unet.conv_out.weight.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("cascade") / "model"
    model.save_pretrained(folder)
    return model.eval(), folder


def test_the_export_is_two_if_pipelines_that_generate_from_a_prompt(cascade_folder) -> None:
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    model, folder = cascade_folder
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "IFPipeline"
    assert json.loads((folder / "super_resolution" / "model_index.json").read_text())["_class_name"] == "IFSuperResolutionPipeline"
    base = IFPipeline.from_pretrained(str(folder))
    sr = IFSuperResolutionPipeline.from_pretrained(str(folder / "super_resolution"))
    prompts = ["a thin handwritten three", "a bold seven"]
    g = torch.Generator().manual_seed(0)
    low = base(prompts, guidance_scale=1.0, num_inference_steps=3, output_type="pt", clean_caption=False, generator=g).images
    assert low.shape == (2, 1, 8, 8)
    high = sr(prompts, image=low, guidance_scale=3.0, num_inference_steps=3, output_type="np", clean_caption=False, generator=g).images
    assert high.shape == (2, 16, 16, 1) and torch.isfinite(torch.as_tensor(high)).all()
    one = sr("a thin handwritten three", image=low[:1], num_inference_steps=2, clean_caption=False).images[0]
    assert one.size == (16, 16)
    # The stage II UNet is called as privdiff calls it: noisy image + upsampled image, the noise level as class label.
    embedded, _ = sr.encode_prompt(prompts, do_classifier_free_guidance=False, num_images_per_prompt=1, device="cpu", clean_caption=False)
    with torch.no_grad():
        x, t, level = torch.randn(2, 1, 16, 16), torch.tensor([10, 700]), torch.tensor([0, 250])
        up = model.upsample(low)
        noise_and_variance = sr.unet(torch.cat([x, up], 1), t, encoder_hidden_states=embedded, class_labels=level).sample
        assert noise_and_variance.shape[1] == 2 and torch.equal(noise_and_variance[:, 1:], torch.zeros_like(x))
        mine = model.net.super_resolve(x, t, up, level, model.condition_embedding(prompts))
        assert torch.allclose(noise_and_variance[:, :1], mine, atol=1e-5)


def test_privdiff_reads_both_stages_back_as_the_same_model(cascade_folder) -> None:
    model, folder = cascade_folder
    loaded = load_model(folder)
    assert isinstance(loaded, PixelCascade) and loaded.image_shape == (1, 16, 16) and loaded.latent_shape == (1, 8, 8)
    assert loaded.noise_level == model.noise_level and loaded.scale_factor == 2
    for mine, theirs in zip(model.trainable.state_dict().values(), loaded.trainable.state_dict().values()):
        assert torch.equal(mine, theirs)
    with torch.no_grad():
        a = model.sample(2, steps=3, cond=["one", "two"], generator=torch.Generator().manual_seed(1))
        b = loaded.sample(2, steps=3, cond=["one", "two"], generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b) and a.shape == (2, 1, 16, 16) and 0 <= float(a.min()) and float(a.max()) <= 1
        images = torch.rand(3, 1, 16, 16)
        assert model.encode(images).shape == (3, 1, 8, 8)
        assert torch.equal(loaded.decode(loaded.encode(images)), loaded.decode(loaded.encode(images)))  # a deterministic decoding
    # Its base stage alone is a PixelTextToImage folder: privdiff reads the base stage as one, diffusers as IF stage I.
    assert isinstance(PixelTextToImage.from_pretrained(folder), PixelTextToImage)


def test_a_base_model_folder_starts_the_base_stage_of_a_new_cascade(tmp_path) -> None:
    torch.manual_seed(0)
    base = PixelTextToImage(image_size=8, channels=1, block_out_channels=(8, 16), attention_head_dim=4, text_width=16, text_layers=1)
    base.save_pretrained(tmp_path / "base")
    cascade = tiny(pretrained=str(tmp_path / "base"))
    assert cascade.image_shape == (1, 16, 16) and cascade.latent_shape == (1, 8, 8)
    for name, p in base.net.unet.state_dict().items():
        assert torch.equal(p, cascade.net.unet.state_dict()[name]), name
    with pytest.raises(ValueError, match="data are"):
        tiny(image_size=32, scale_factor=2, pretrained=str(tmp_path / "base"))  # a 16x16 base stage from an 8x8 folder


def test_a_dp_step_gives_each_image_its_own_gradient_through_both_stages() -> None:
    from privdiff.defenses.dp_sgd import DPSGDDefense

    model = tiny(train_text_encoder=True, caption_dropout=0.5)
    batch = Batch(torch.rand(3, 1, 16, 16), ["one", "two", "three"], torch.arange(3))
    params = model.trainable_parameters()
    names = [n for n, p in model.trainable.named_parameters() if p.requires_grad]
    assert any(n.startswith("sr_unet.class_embedding") for n in names) and any(n.startswith("text_encoder") for n in names)
    losses = model.per_example_loss(batch, generator=torch.Generator().manual_seed(0))
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    expected = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    dp = DPSGDDefense(noise_multiplier=1.0, max_grad_norm=1.0)
    dp.on_data_ready(num_examples=64, batch_size=3)
    model.trainable = dp.wrap_model(model.trainable)
    model.per_example_loss(batch, generator=torch.Generator().manual_seed(0)).mean().backward()
    for j, (name, p) in enumerate(zip(names, params)):
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 3, name
        for i in range(3):
            want = expected[i][j] if expected[i][j] is not None else torch.zeros_like(p)
            assert torch.allclose(p.grad_sample[i], want, atol=1e-5, rtol=1e-3), (name, i)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="scale_factor"):
        tiny(scale_factor=3)
    with pytest.raises(ValueError, match="noise_level"):
        tiny(noise_level=1000)


def _fit(tmp_path: Path, name: str, *extra: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_fit_cli(["fit", *DATA, "-c", "configs/model/t2i_pixel_cascade_tiny.yaml", *WIDTHS, "--run_dir", str(tmp_path / name),
                            *extra])


@pytest.mark.slow
def test_the_cascade_config_trains_under_dp_sgd_and_its_saved_folder_is_audited(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    cli = _fit(tmp_path, "dp", "-c", "configs/defense/dp_sgd.yaml", "--trainer.max_steps", "3", "--audit", "null")
    dp = [d for d in cli.model.defenses if d.guarantee() is not None]
    assert len(dp) == 1 and dp[0].steps == 3 and 0 < dp[0].epsilon() <= 10
    folder = tmp_path / "dp" / "model"
    assert isinstance(load_model(folder), PixelCascade) and (folder / "super_resolution" / "model_index.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["audit", "--run", str(tmp_path / "dp"), "-c", "configs/audit/fast.yaml", "--out", str(tmp_path / "audit"),
              "--audit.num_samples", "16", "--audit.steps", "4"])
    found = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert found["model"]["kind"] == "pixel text-to-image cascade" and found["model"]["resolution"] == 16
    assert found["sampling"]["num_samples"] == 16 and {"quality", "extraction", "memorization", "mia"} <= set(found)
    assert found["privacy"]["known"] and found["privacy"]["epsilon"] == pytest.approx(dp[0].epsilon())


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["caption_randomization", "prompt_mitigation"])
def test_it_trains_and_is_audited_with_the_caption_defenses(tmp_path, monkeypatch, defense) -> None:
    """The text embedding's noise reaches both stages in training; a mitigated prompt embedding conditions both in sampling."""
    monkeypatch.chdir(REPO)
    _fit(tmp_path, defense, "-c", f"configs/defense/{defense}.yaml", "--trainer.max_steps", "2", "-c", "configs/audit/fast.yaml",
         "--audit.num_samples", "16", "--audit.steps", "4")
    found = json.loads((tmp_path / defense / "audit.json").read_text())
    assert found["model"]["kind"] == "pixel text-to-image cascade" and defense in found["run"]["defenses"]
