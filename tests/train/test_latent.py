"""Latent text-to-image models: the tiny pipeline, LoRA, DP-LoRA's per-example gradients and accounting,
fine-tuning a saved Stable Diffusion folder through ``privdiff fit``, and the exported folders diffusers loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from opacus.accountants import create_accountant

from privdiff.cli import run_fit_cli
from privdiff.defenses.dp_sgd import DPSGDDefense
from privdiff.model import Batch
from privdiff.train.latent import LatentTextToImage, offline_clip_tokenizer
from privdiff.train.models import load_model

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
# An 8x8 grayscale pipeline: VAE 8 -> 4x4 latents, UNet (8, 16) with cross-attention, a 16-d text encoder.
TINY = dict(image_size=8, channels=1, vae_block_out_channels=(8, 16), block_out_channels=(8, 16), attention_head_dim=4,
            text_width=16, text_layers=1, vae_steps=0)
TINY_ARGS = ["--model.diffusion.class_path", "privdiff.train.latent.LatentTextToImage",
             "--model.diffusion.init_args.vae_block_out_channels", "[8, 16]", "--model.diffusion.init_args.block_out_channels", "[8, 16]",
             "--model.diffusion.init_args.attention_head_dim", "4", "--model.diffusion.init_args.text_width", "16",
             "--model.diffusion.init_args.text_layers", "1"]
DATA_ARGS = ["-c", "configs/base.yaml", "-c", "configs/data/captioned_digits.yaml", "--data.image_size", "8",
             "--data.num_members", "16", "--data.num_heldout", "8", "--data.duplicate_images", "2", "--data.duplicate_copies", "3",
             "--data.batch_size", "4", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1", "--audit", "null"]


def tiny(seed: int = 0, **kwargs) -> LatentTextToImage:
    torch.manual_seed(seed)
    return LatentTextToImage(**{**TINY, **kwargs})


def draws(b: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    captions = ["a cat on a mat", "a thin handwritten seven, upright", "two dogs in the snow", "an empty room"][:b]
    return torch.rand(b, 1, 8, 8, generator=g), captions, torch.randint(0, 1000, (b,), generator=g), torch.randn(b, 4, 4, 4, generator=g)


def test_the_offline_tokenizer_is_clips_real_vocabulary() -> None:
    tok = offline_clip_tokenizer()
    from open_clip import tokenizer as oc

    assert len(tok) == 49408 and tok.model_max_length == 77
    text = "a photo of Ada Lovelace, smiling; 2 cats"
    ours = tok(text).input_ids
    assert ours[0] == 49406 and ours[-1] == 49407  # <|startoftext|>, <|endoftext|>
    assert ours == [49406, *oc.SimpleTokenizer().encode(text), 49407]  # the same BPE as CLIP's own tokenizer


def test_a_shorter_text_context_pads_to_it_saves_with_it_and_warns_before_training_of_captions_it_truncates(tmp_path) -> None:
    from privdiff.train.data import load_builtin

    pool = load_builtin("captioned_digits", 8, 1)
    model = tiny(max_tokens=24)
    ids = model.embed_condition(["a cat", pool.captions[0]])
    assert ids.shape == (2, 24) and model.condition_embedding(["a cat"]).shape == (1, 24, 16)
    x0 = model.encode(pool.unit()[:2])
    assert model.predict_noise(x0, torch.tensor([5, 500]), ids).shape == x0.shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the built-in captions (17-20 tokens) fit in 24
        model.prepare(None, pool.select(range(32)))
    short = tiny(max_tokens=12)
    with pytest.warns(UserWarning, match=r"32 of 32 member captions are longer than the text encoder's 12 tokens.*max_tokens"):
        short.prepare(None, pool.select(range(32)))
    model.save_pretrained(tmp_path / "sd")
    loaded = load_model(tmp_path / "sd")
    assert loaded.max_tokens == 24 and loaded.embed_condition(["a cat"]).shape == (1, 24)
    with pytest.raises(ValueError, match="max_tokens must be in"):
        tiny(max_tokens=100)


def break_lora_zero_init(model: LatentTextToImage) -> None:
    """LoRA starts with B = 0, which makes A's gradients zero: random B so every adapter gradient is non-trivial."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.trainable.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_trains_only_the_adapters_and_their_per_example_gradients_equal_a_loop() -> None:
    b = 3
    x, captions, t, noise = draws(b)
    reference_model = tiny(lora_rank=2, caption_dropout=0.0)
    break_lora_zero_init(reference_model)
    trainable = [n for n, p in reference_model.trainable.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the base UNet and the text encoder are frozen
    reference = []
    for i in range(b):
        reference_model.zero_grad()
        reference_model.per_example_loss(Batch(x[i : i + 1], captions[i : i + 1], torch.arange(1)), t[i : i + 1], noise[i : i + 1]).mean().backward()
        reference.append({n: p.grad.clone() for n, p in reference_model.trainable.named_parameters() if p.requires_grad})

    model = tiny(lora_rank=2, caption_dropout=0.0)
    break_lora_zero_init(model)
    d = DPSGDDefense(noise_multiplier=1.0)
    d.on_data_ready(40, 8)
    model.trainable = d.wrap_model(model.trainable)
    model.per_example_loss(Batch(x, captions, torch.arange(b)), t, noise).mean().backward(inputs=d.backward_inputs(model.trainable))
    checked = 0
    for name, p in model.trainable._module.named_parameters():
        if not p.requires_grad:
            assert getattr(p, "grad_sample", None) is None, name  # no per-example gradient of a frozen weight
            continue
        expected = torch.stack([r[name] for r in reference])
        assert expected.abs().sum() > 0, name
        torch.testing.assert_close(p.grad_sample, expected, atol=1e-6, rtol=1e-4, msg=name)
        checked += 1
    assert checked == len(trainable)


def test_a_dp_lora_step_changes_the_adapters_only() -> None:
    model = tiny(lora_rank=2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    d = DPSGDDefense(noise_multiplier=1.0)
    d.on_data_ready(40, 8)
    model.trainable = d.wrap_model(model.trainable)
    opt = d.wrap_optimizer(torch.optim.SGD(model.trainable_parameters(), lr=0.1), model.trainable)
    x, captions, t, noise = draws(4)
    model.per_example_loss(Batch(x, captions, torch.arange(4)), t, noise).mean().backward(inputs=d.backward_inputs(model.trainable))
    d.on_before_optimizer_step(model.trainable)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.trainable_parameters()))  # noise reaches every adapter
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)


def test_caption_dropout_and_guidance() -> None:
    model = tiny(caption_dropout=0.5)
    seen: list[list[str]] = []
    real = model.embed_condition
    model.embed_condition = lambda cond: (seen.append(list(cond)), real(cond))[1]  # type: ignore[method-assign]
    x, captions, t, noise = draws(4)
    model.per_example_loss(Batch(x.repeat(8, 1, 1, 1), captions * 8, torch.arange(32)), t.repeat(8), noise.repeat(8, 1, 1, 1))
    dropped = sum(c == "" for c in seen[-1])
    assert 4 <= dropped <= 28  # about half the captions became the empty one (classifier-free guidance training)
    model.eval()
    model.guidance_scale = 3.0
    images = model.sample(2, steps=3, cond=["a cat", "a dog"], generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and 0 <= images.min() and images.max() <= 1


def test_public_pretraining_trains_the_base_not_the_adapters_and_lowers_the_loss_on_public_images() -> None:
    from privdiff.train.data import load_builtin

    pool = load_builtin("captioned_digits", 8, 1)
    public, members = pool.select(range(200, 600)), pool.select(range(32))
    model = tiny(vae_steps=2, lora_rank=2, pretrain_steps=60, pretrain_batch_size=16)
    names = lambda: sorted(n for n, p in model.net.named_parameters() if p.requires_grad)  # noqa: E731
    trainable = names()
    assert trainable and all("lora_" in n for n in trainable)
    base = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    batch = Batch(public.unit()[:64], public.captions[:64], torch.arange(64))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    model.eval()
    before = float(model.per_example_loss(batch, generator=g()).mean())
    record = model.prepare(public, members)
    after = float(model.per_example_loss(batch, generator=g()).mean())
    assert record["pretrained"]["steps"] == 60 and record["pretrained"]["batch_size"] == 16
    assert record["pretrained"]["trained_on"].startswith("non-member images")
    assert after < before
    changed = {n for n, p in model.net.named_parameters() if not torch.equal(p, base[n])}
    assert changed and not any("lora_" in n for n in changed)  # the base moved, the adapters did not
    assert names() == trainable  # and only the adapters train from here on
    with pytest.raises(ValueError, match="public captioned images"):
        tiny(vae_steps=2, pretrain_steps=2).prepare(None, members)
    with pytest.raises(ValueError, match="pretrain_steps"):
        LatentTextToImage(pretrained="/nonexistent", pretrain_steps=2)


def test_the_tiny_vae_learns_to_reconstruct_from_public_images_before_training() -> None:
    from privdiff.train.data import load_builtin

    pool = load_builtin("captioned_digits", 8, 1)
    model = tiny(vae_steps=150, vae_batch_size=32)
    x = pool.unit()[:64]
    untrained = float((model.decode(model.encode(x)) - x).pow(2).flatten(1).mean(1).sqrt().mean())
    record = model.prepare(pool.select(range(200, 600)), pool.select(range(64)))
    assert record["trained_on"].startswith("non-member images") and record["num_images"] == 360 and record["steps"] == 150
    assert record["reconstruction_l2"] < 0.6 * untrained  # measured on images it did not train on
    trained = float((model.decode(model.encode(x)) - x).pow(2).flatten(1).mean(1).sqrt().mean())
    assert trained < 0.6 * untrained
    assert model.prepare(None, pool) == record  # prepared once: a resume does not train it again
    fallback = tiny(vae_steps=2).prepare(None, pool.select(range(32)))
    assert "member images" in fallback["trained_on"] and "outside any DP guarantee" in fallback["trained_on"]
    assert "cache" not in fallback  # a VAE trained on members is not kept


def test_a_vae_trained_on_public_images_is_kept_by_content_and_reused_only_for_the_same_start(tmp_path, monkeypatch) -> None:
    from privdiff.train.data import load_builtin

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pool = load_builtin("captioned_digits", 8, 1)
    public, members = pool.select(range(200, 400)), pool.select(range(64))
    first = tiny(seed=4, vae_steps=5)
    record = first.prepare(public, members)
    assert len(list((tmp_path / "privdiff" / "vae").glob("*.safetensors"))) == 1
    again = tiny(seed=4, vae_steps=5)
    assert again.prepare(public, members) == record and record["cache"].endswith(".safetensors")
    assert all(torch.equal(a, b) for a, b in zip(first.vae.state_dict().values(), again.vae.state_dict().values()))
    assert float(again.latent_scale) == float(first.latent_scale)
    for other in (tiny(seed=5, vae_steps=5), tiny(seed=4, vae_steps=6)):  # another start, other settings: trained anew
        other.prepare(public, members)
    other_images = tiny(seed=4, vae_steps=5)
    other_images.prepare(pool.select(range(400, 600)), members)
    assert len(list((tmp_path / "privdiff" / "vae").glob("*.safetensors"))) == 4
    # the key is the same in another process (another hash seed than this one's): the settings of a comparison share it
    script = ("import sys, torch; sys.path.insert(0, %r); from test_latent import tiny; "
              "from privdiff.train.data import load_builtin; "
              "print(tiny(seed=4, vae_steps=5)._vae_cache(load_builtin('captioned_digits', 8, 1).select(range(200, 400))).path)"
              % str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "1"}).stdout.strip().splitlines()[-1]
    assert out == record["cache"]
    uncached = tiny(seed=4, vae_steps=5, vae_cache=False)
    assert "cache" not in uncached.prepare(public, members)
    assert all(torch.equal(a, b) for a, b in zip(first.vae.state_dict().values(), uncached.vae.state_dict().values()))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion folder written by ``StableDiffusionPipeline.save_pretrained`` (what a user downloads)."""
    from privdiff.train.data import load_builtin

    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    model = tiny(vae_steps=30)
    model.prepare(load_builtin("captioned_digits", 8, 1).select(range(1000, 1400)), None)
    model.save_pretrained(folder)
    return folder


def test_the_saved_folder_is_a_stable_diffusion_pipeline(sd_folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None)
    out = pipe("a bold handwritten seven", num_inference_steps=2, height=8, width=8, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape[:3] == (1, 8, 8) and ((0 <= out) & (out <= 1)).all()
    loaded = load_model(sd_folder)
    assert isinstance(loaded, LatentTextToImage) and loaded.image_shape == (1, 8, 8)
    assert loaded.summary()["vae"]["steps"] == 30


def test_a_bin_weight_file_is_refused(tmp_path: Path, sd_folder: Path) -> None:
    import shutil

    copy = tmp_path / "sd"
    shutil.copytree(sd_folder, copy)
    for f in (copy / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ValueError, match="safetensors only"):
        LatentTextToImage(image_size=8, channels=1, pretrained=str(copy))


def _fit(tmp_path: Path, name: str, *extra: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_fit_cli(["fit", *DATA_ARGS, "--run_dir", str(tmp_path / name), *extra])


@pytest.mark.slow
def test_fine_tuning_a_saved_folder_with_lora_and_dp_lora_exports_pipelines_diffusers_load(tmp_path, sd_folder, monkeypatch) -> None:
    from diffusers import StableDiffusionPipeline

    monkeypatch.chdir(REPO)
    pretrained = ["-c", "configs/model/sd_lora.yaml", "--model.diffusion.init_args.pretrained", str(sd_folder),
                  "--model.diffusion.init_args.lora_rank", "2", "--trainer.max_steps", "4"]
    lora = _fit(tmp_path, "lora", *pretrained)
    dp = _fit(tmp_path, "dp", *pretrained, "-c", "configs/defense/dp_lora.yaml", "--model.diffusion.init_args.lora_rank", "2",
              "--data.defenses.init_args.target_epsilon", "null", "--data.defenses.init_args.noise_multiplier", "1.0")
    d = dp.model.defenses.find("dp_sgd")
    assert dp.trainer.global_step == d.steps == 4
    independent = create_accountant("prv")
    for _ in range(4):
        independent.step(noise_multiplier=1.0, sample_rate=d.sample_rate)
    assert d.epsilon() == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)
    # DP-LoRA noised the adapters only: the exported base weights of the frozen parts are the folder's.
    for run in (lora, dp):
        model_dir = Path(run.trainer.default_root_dir) / "model"
        pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None)
        out = pipe("a thin handwritten three", num_inference_steps=2, height=8, width=8, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert out.shape[:3] == (1, 8, 8) and torch.isfinite(torch.as_tensor(out)).all()
        # The adapters alone, on the original folder: the same UNet as the exported (fused) one.
        base = StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None)
        base.load_lora_weights(str(model_dir / "lora"))
        x, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 500])
        hidden = base.text_encoder(base.tokenizer(["a cat", "a dog"], padding="max_length", return_tensors="pt").input_ids)[0]
        with torch.no_grad():
            adapted, fused = base.unet(x, t, hidden).sample, pipe.unet(x, t, hidden).sample
            original = StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None).unet(x, t, hidden).sample
        torch.testing.assert_close(adapted, fused, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(adapted, original, atol=1e-6)  # the fine-tuning changed the model
        text = pipe.text_encoder.state_dict()
        assert all(torch.equal(v, base.text_encoder.state_dict()[k]) for k, v in text.items())  # frozen
    manifest = json.loads((tmp_path / "dp" / "manifest.json").read_text())
    assert set(manifest["captions"]) == set(manifest["members"]) and all(manifest["captions"].values())


@pytest.mark.slow
def test_sigkill_and_resume_of_dp_lora_keeps_the_accountant(tmp_path, sd_folder, monkeypatch, fit_until_checkpoint_then_sigkill) -> None:
    monkeypatch.chdir(REPO)
    (tmp_path / "every2.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {filename: 'step{step:06d}', auto_insert_metric_name: false, save_last: true,\n"
        "                  every_n_train_steps: 2, save_top_k: 1, monitor: step, mode: max}\n"
    )
    args = [*DATA_ARGS, "-c", "configs/model/sd_lora.yaml", "--model.diffusion.init_args.pretrained", str(sd_folder),
            "-c", "configs/defense/dp_lora.yaml", "--model.diffusion.init_args.lora_rank", "2",
            "--data.defenses.init_args.target_epsilon", "null", "--data.defenses.init_args.noise_multiplier", "1.0",
            "-c", str(tmp_path / "every2.yaml")]
    run = tmp_path / "killed"
    last = run / "checkpoints" / "last.ckpt"
    fit_until_checkpoint_then_sigkill(args, run, tmp_path / "killed.log", REPO, timeout_s=180, after_s=0.3)
    saved = torch.load(last, weights_only=True)
    k = saved["global_step"]
    assert k >= 2 and saved["defenses"]["dp_sgd"]["steps"] == k
    total = k + 3
    resumed = _fit(tmp_path, "killed", *args[len(DATA_ARGS):], "--trainer.max_steps", str(total), "--ckpt_path", "last")
    d = resumed.model.defenses.find("dp_sgd")
    assert resumed.trainer.global_step == d.steps == total
    assert d.accountant.history == [(1.0, d.sample_rate, total)]  # neither reset nor a lost step counted twice
    independent = create_accountant("prv")
    independent.history = [(1.0, d.sample_rate, total)]
    assert d.epsilon() == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)


def test_a_text_model_without_captions_fails_before_training(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match="captioned data"):
        _fit(tmp_path, "uncaptioned", *TINY_ARGS, "--data.source", "digits", "--trainer.max_steps", "2")
    assert not (tmp_path / "uncaptioned" / "checkpoints").exists()


@pytest.mark.slow
def test_the_shipped_tiny_config_trains_from_scratch_and_audits_with_the_captions(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    cli = _fit(tmp_path, "t2i", "-c", "configs/model/t2i_tiny.yaml", *TINY_ARGS[2:], "--model.diffusion.init_args.vae_steps", "20",
               "--trainer.max_steps", "3", "-c", "configs/audit/fast.yaml", "--audit.num_samples", "32")
    audit = json.loads((tmp_path / "t2i" / "audit.json").read_text())
    assert audit["model"]["kind"] == "latent text-to-image" and audit["model"]["vae"]["steps"] == 20
    assert audit["sampling"]["num_samples"] == 32
    assert cli.trainer.global_step == 3
    vae = {k: v.clone() for k, v in cli.model.diffusion.vae.state_dict().items()}
    resumed = _fit(tmp_path, "t2i", "-c", "configs/model/t2i_tiny.yaml", *TINY_ARGS[2:], "--model.diffusion.init_args.vae_steps", "20",
                   "--trainer.max_steps", "5", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 5
    after = resumed.model.diffusion.vae.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in vae.items())  # the resumed run keeps its autoencoder, never retrains it
    assert resumed.model.diffusion.vae_record == cli.model.diffusion.vae_record


def test_the_output_filter_sees_decoded_samples_of_a_text_model() -> None:
    from privdiff.defenses.base import GenerationContext
    from privdiff.defenses.output_filter import OutputFilterDefense
    from privdiff.eval.sampling import generate

    model = tiny().eval()
    prompts = ["a cat", "a dog", "a cat", "a dog"]
    plain = generate(model, 4, steps=3, prompts=prompts, seed=0, progress=False)
    assert plain.images.shape == (4, 1, 8, 8) and plain.labels.tolist() == [0, 1, 0, 1]  # one label per distinct prompt
    # The members are the very images the model draws with this seed: the filter must refuse every one.
    f = OutputFilterDefense(threshold=1.0, n=2)
    filtered = generate(model, 4, steps=3, prompts=prompts, seed=0, defenses=[f], progress=False, max_rounds=1,
                        context=GenerationContext(reference=plain.images.flatten(1)))
    assert f.checked == 4 and f.rejected == 4 and filtered.num_rejected == 4 and len(filtered.images) == 0
    with pytest.raises(ValueError, match="samples from prompts"):
        generate(model, 4, steps=3, seed=0, progress=False)
