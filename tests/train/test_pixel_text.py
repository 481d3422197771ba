"""The pixel text-to-image model (Imagen / DeepFloyd IF style): its IF export, its defenses and its audit."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from privdiff.cli import run_fit_cli
from privdiff.model import Batch
from privdiff.train.models import load_model
from privdiff.train.pixel_text import PixelTextToImage

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TINY = dict(image_size=8, channels=1, block_out_channels=(8, 16), attention_head_dim=4, text_width=16, text_layers=1)
TINY_ARGS = ["-c", "configs/model/t2i_pixel_tiny.yaml", "--model.diffusion.init_args.block_out_channels", "[8, 16]",
             "--model.diffusion.init_args.attention_head_dim", "4", "--model.diffusion.init_args.text_width", "16",
             "--model.diffusion.init_args.text_layers", "1"]
DATA_ARGS = ["-c", "configs/base.yaml", "-c", "configs/data/captioned_digits.yaml", "--data.image_size", "8",
             "--data.num_members", "16", "--data.num_heldout", "16", "--data.duplicate_images", "2", "--data.duplicate_copies", "3",
             "--data.batch_size", "4", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]


def tiny(seed: int = 0, **kwargs) -> PixelTextToImage:
    torch.manual_seed(seed)
    return PixelTextToImage(**{**TINY, **kwargs})


@pytest.fixture(scope="module")
def if_folder(tmp_path_factory) -> tuple[PixelTextToImage, Path]:
    model = tiny(seed=3)
    with torch.no_grad():  # a conv_out of random weights, not diffusers' zero init: the variance half must stay apart
        model.net.unet.conv_out.weight.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("pixel_t2i") / "model"
    model.save_pretrained(folder)
    return model.eval(), folder


def test_the_export_is_an_if_pipeline_that_generates_from_a_prompt(if_folder) -> None:
    from diffusers import IFPipeline

    model, folder = if_folder
    pipe = IFPipeline.from_pretrained(str(folder))
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "IFPipeline"
    image = pipe("a thin handwritten three", guidance_scale=1.0, num_inference_steps=3, clean_caption=False,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (8, 8)
    guided = pipe(["a thin handwritten three", "a bold seven"], guidance_scale=3.0, num_inference_steps=3, clean_caption=False,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert guided.shape == (2, 8, 8, 1) and torch.isfinite(torch.as_tensor(guided)).all()
    # The pipeline's text embeddings (IF masks the padding) and noise prediction are the model's.
    captions = ["a thin handwritten three", "a bold seven, leaning right"]
    embedded, negative = pipe.encode_prompt(captions, do_classifier_free_guidance=True, num_images_per_prompt=1, device="cpu",
                                            clean_caption=False)
    with torch.no_grad():
        assert torch.allclose(embedded, model.condition_embedding(captions), atol=1e-6)
        assert torch.allclose(negative, model.condition_embedding(["", ""]), atol=1e-6)
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 700])
        noise_and_variance = pipe.unet(x, t, encoder_hidden_states=embedded).sample
        assert noise_and_variance.shape[1] == 2 and torch.equal(noise_and_variance[:, 1:], torch.zeros_like(x))
        assert torch.allclose(noise_and_variance[:, :1], model.predict_noise(x, t, model.embed_condition(captions)), atol=1e-5)


def test_privdiff_reads_its_export_back_as_the_same_model(if_folder) -> None:
    model, folder = if_folder
    loaded = load_model(folder)
    assert isinstance(loaded, PixelTextToImage) and loaded.image_shape == (1, 8, 8)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 400, 999])
    ids = model.embed_condition(["one", "two", ""])
    with torch.no_grad():
        assert torch.equal(loaded.predict_noise(x, t, ids), model.predict_noise(x, t, ids))
        a = model.sample(2, steps=4, cond=["one", "two"], generator=torch.Generator().manual_seed(1))
        b = loaded.sample(2, steps=4, cond=["one", "two"], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 1, 8, 8) and 0 <= float(a.min()) and float(a.max()) <= 1


def test_the_padding_of_a_caption_is_masked_as_the_tokenizer_masks_it() -> None:
    model = tiny()
    captions = ["a", "a bold handwritten seven, leaning right, signed by the coral otter of the harbor", ""]
    tokens = model.tokenizer(captions, padding="max_length", max_length=model.max_tokens, truncation=True, return_tensors="pt")
    end = (tokens.input_ids == model.tokenizer.eos_token_id).long()
    assert torch.equal(((end.cumsum(1) - end) == 0).long(), tokens.attention_mask)
    with torch.no_grad():
        masked = model.net.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        assert torch.allclose(model.condition_embedding(captions), masked, atol=1e-6)


def test_caption_dropout_and_a_defense_wrapped_step_train_the_whole_net() -> None:
    from privdiff.defenses.dp_sgd import DPSGDDefense

    model = tiny(train_text_encoder=True, caption_dropout=0.5)
    images = torch.rand(6, 1, 8, 8)
    batch = Batch(images, ["one", "two", "three", "four", "five", "six"], None)
    g = torch.Generator().manual_seed(0)
    dropped = model.per_example_loss(batch, generator=g)
    assert dropped.shape == (6,) and torch.isfinite(dropped).all()
    dp = DPSGDDefense(noise_multiplier=1.0, max_grad_norm=1.0)
    dp.on_data_ready(num_examples=64, batch_size=6)
    net = dp.wrap_model(model.trainable)
    model.trainable = net
    model.per_example_loss(batch).mean().backward()
    grads = [p.grad_sample for p in net.parameters() if p.requires_grad and getattr(p, "grad_sample", None) is not None]
    assert grads and all(g.shape[0] == 6 for g in grads)
    text = [p for n, p in net.named_parameters() if "text_encoder" in n and p.requires_grad]
    assert text and all(getattr(p, "grad_sample", None) is not None for p in text)  # the text encoder is trained privately too


def _fit(tmp_path: Path, name: str, *extra: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_fit_cli(["fit", *DATA_ARGS, *TINY_ARGS, "--run_dir", str(tmp_path / name), *extra])


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["dp_sgd", "dedup", "caption_randomization", "prompt_mitigation"])
def test_it_trains_and_is_audited_with_each_text_to_image_defense(tmp_path, monkeypatch, defense) -> None:
    monkeypatch.chdir(REPO)
    audit = ["-c", "configs/audit/fast.yaml", "--audit.num_samples", "16"]
    cli = _fit(tmp_path, defense, "-c", f"configs/defense/{defense}.yaml", "--trainer.max_steps", "3", *audit)
    found = json.loads((tmp_path / defense / "audit.json").read_text())
    assert found["model"]["kind"] == "pixel text-to-image" and found["sampling"]["num_samples"] == 16
    assert defense in found["run"]["defenses"]
    assert cli.trainer.global_step == 3 or defense == "dp_sgd"  # Poisson batches: DP counts its own steps
    assert isinstance(load_model(tmp_path / defense / "model"), PixelTextToImage)
