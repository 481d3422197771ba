"""DP-SGD from Opacus's parts: per-sample gradients, per-image clipping, Poisson batches, accounting, budget, resume."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from torch.utils.data import DataLoader

from privdiff.defenses.dp_sgd import DPSGDDefense
from privdiff.defenses.per_sample_grads import per_example_norms
from privdiff.cli import run_fit_cli
from privdiff.train.data import DiffusionDataModule, ImageTable
from privdiff.model import Batch
from privdiff.train.denoiser import build_scheduler, build_unet
from privdiff.train.pixel import PixelDiffusion
from privdiff.train.module import DiffusionModule

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_unet(8, 1, block_out_channels=(8, 16), attention_levels=(1,), norm_num_groups=8)


def draws(b: int, k: int, seed: int = 0):
    """B images repeated K times (rows [i*K:(i+1)*K] are image i) with fixed timesteps and noise."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(b, 1, 8, 8, generator=g) * 2 - 1).repeat_interleave(k, 0)
    return x, torch.randint(0, 1000, (b * k,), generator=g), torch.randn(b * k, 1, 8, 8, generator=g)


def per_image_loop(b: int, k: int) -> list[dict[str, torch.Tensor]]:
    """Reference: each image's gradient from its own backward, the mean of its K draws."""
    den = PixelDiffusion.from_parts(tiny_unet(), build_scheduler())
    x, t, noise = draws(b, k)
    out = []
    for i in range(b):
        den.zero_grad()
        rows = slice(i * k, (i + 1) * k)
        loss(den, x[rows], timesteps=t[rows], noise=noise[rows]).mean().backward()
        out.append({n: p.grad.clone() for n, p in den.trainable.named_parameters()})
    return out


def loss(model: PixelDiffusion, x: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """The trainer's per-example loss of images ``x`` in [-1, 1] (the model's space)."""
    return model.per_example_loss(Batch((x + 1) / 2, labels, torch.arange(len(x))), **kwargs)


def dp(n: int = 40, batch_size: int = 8, **kwargs) -> DPSGDDefense:
    kwargs.setdefault("noise_multiplier", 1.0)
    d = DPSGDDefense(**kwargs)
    d.on_data_ready(n, batch_size)
    return d


def wrapped_step(d: DPSGDDefense, b: int, k: int):
    """One step of the trainer's recipe through the defense; returns the wrapped denoiser."""
    unet = tiny_unet()
    wrapped = d.wrap_model(unet)
    assert d.wrap_model(unet) is wrapped and d.wrap_model(wrapped) is wrapped  # never wrapped twice
    den = PixelDiffusion.from_parts(wrapped, build_scheduler())
    opt = d.wrap_optimizer(torch.optim.SGD(wrapped.parameters(), lr=0.0), wrapped)
    x, t, noise = draws(b, k)
    opt.zero_grad()
    # The trainer's backward (DiffusionModule.backward): to the layers' inputs only.
    loss(den, x, timesteps=t, noise=noise).mean().backward(inputs=d.backward_inputs(wrapped))
    d.on_before_optimizer_step(wrapped)
    return den, opt


# -- 1. per-sample gradients -----------------------------------------------------------------------
@pytest.mark.parametrize("mode,k", [("hooks", 1), ("functorch", 1), ("hooks", 3)])
def test_per_image_gradients_equal_a_micro_batch_loop_for_every_parameter(mode: str, k: int) -> None:
    b = 3
    reference = per_image_loop(b, k)
    den, _ = wrapped_step(dp(noise_multiplicity=k, grad_sample_mode=mode), b, k)
    names = [n for n, _ in den.trainable._module.named_parameters()]
    assert any("attentions" in n for n in names)
    for name, p in den.trainable._module.named_parameters():
        expected = torch.stack([r[name] for r in reference])
        assert p.grad_sample.shape == expected.shape, name
        torch.testing.assert_close(p.grad_sample, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_the_backward_pass_skips_the_discarded_parameter_gradients() -> None:
    d = dp()
    den, _ = wrapped_step(d, 2, 1)
    leaves = d.backward_inputs(den.trainable)
    assert leaves and all(not isinstance(t, torch.nn.Parameter) for t in leaves)  # input image, timestep features
    assert all(p.grad is None and p.grad_sample is not None for p in den.trainable.parameters())


def test_per_image_gradients_of_a_class_conditional_model_reach_the_label_embedding() -> None:
    """A layer fed integers (the class embedding) is reached through its output, and no parameter gets a summed gradient."""
    b = 3

    def unet() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_unet(8, 1, block_out_channels=(8, 16), attention_levels=(1,), num_classes=4)

    x, t, noise = draws(b, 1)
    labels = torch.tensor([0, 3, 1])
    den = PixelDiffusion.from_parts(unet(), build_scheduler())
    reference = []
    for i in range(b):
        den.zero_grad()
        loss(den, x[i : i + 1], labels[i : i + 1], timesteps=t[i : i + 1], noise=noise[i : i + 1]).mean().backward()
        reference.append({n: p.grad.clone() for n, p in den.trainable.named_parameters()})
    d = dp()
    wrapped = d.wrap_model(unet())
    loss(PixelDiffusion.from_parts(wrapped, build_scheduler()), x, labels, timesteps=t, noise=noise).mean().backward(
        inputs=d.backward_inputs(wrapped)
    )
    names = [n for n, _ in wrapped._module.named_parameters()]
    assert any("class_embedding" in n for n in names)
    for name, p in wrapped._module.named_parameters():
        torch.testing.assert_close(p.grad_sample, torch.stack([r[name] for r in reference]), atol=1e-5, rtol=1e-4, msg=name)
        assert p.grad is None, name


def test_plain_opacus_hooks_are_wrong_after_the_attention_block() -> None:
    """The trap the contiguity hooks fix: zero per-sample gradients, no error (opacus 1.6.0)."""
    reference = per_image_loop(2, 1)
    unet = tiny_unet()
    den = PixelDiffusion.from_parts(GradSampleModule(unet), build_scheduler())
    x, t, noise = draws(2, 1)
    loss(den, x, timesteps=t, noise=noise).mean().backward()
    wrong = [
        n for n, p in unet.named_parameters()
        if not torch.allclose(p.grad_sample, torch.stack([r[n] for r in reference]), atol=1e-5)
    ]
    assert any(n.startswith("mid_block") for n in wrong) and any(n.startswith("up_blocks.0") for n in wrong)
    assert all(unet.get_parameter(n).grad_sample.abs().max() == 0 for n in wrong if "conv" in n)


# -- 2. clipping per image ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 4])
def test_one_images_update_never_exceeds_the_clipping_bound(k: int) -> None:
    c = 1e-3
    d = dp(max_grad_norm=c, noise_multiplicity=k)
    den, opt = wrapped_step(d, 1, k)
    raw = torch.cat([p.grad_sample.flatten() for p in den.trainable.parameters()]).norm()
    assert raw > 10 * c  # the bound is active
    opt.step()
    # summed_grad is the clipped sum before noise: one image's whole contribution (its K draws).
    contribution = torch.cat([p.summed_grad.flatten() for p in den.trainable.parameters()]).norm()
    assert contribution <= c * (1 + 1e-5)
    assert contribution >= c * (1 - 1e-4)  # clipped to the bound, not below it


def test_under_bf16_autocast_each_images_update_stays_within_the_bound_and_the_gradients_match_fp32() -> None:
    """trainer.precision bf16-mixed: the layers run in bf16, so the per-image gradients are bf16; their
    norms must still be taken in float32, or a norm rounded down lets an image's update exceed C."""
    c = 1e-3
    grads, contributions = {}, []
    for precision in ("32", "bf16"):
        d = dp(n=64, batch_size=16, max_grad_norm=c)
        torch.manual_seed(0)
        wrapped = d.wrap_model(tiny_unet())
        den = PixelDiffusion.from_parts(wrapped, build_scheduler())
        opt = d.wrap_optimizer(torch.optim.SGD(wrapped.parameters(), lr=0.0), wrapped)
        x, t, noise = draws(16, 1)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            per_row = loss(den, x, timesteps=t, noise=noise)
        per_row.float().mean().backward(inputs=d.backward_inputs(wrapped))
        d.on_before_optimizer_step(wrapped)
        params = list(wrapped.parameters())
        grads[precision] = torch.cat([p.grad_sample.float().flatten(1) for p in params], 1)
        if precision == "bf16":
            assert any(p.grad_sample.dtype == torch.bfloat16 for p in params)  # the case this test is about
            norms = grads[precision].norm(dim=1)
            opt.clip_and_accumulate()
            factors = (c / (per_example_norms([p.grad_sample for p in params]) + 1e-6)).clamp(max=1.0)
            # each image's clipped contribution, from the values the clipped sum adds up
            contributions = factors * norms
            assert (norms > 10 * c).all()
            expected = sum(f * g for f, g in zip(factors, grads[precision]))
            got = torch.cat([p.summed_grad.flatten() for p in params])
            torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-4)
    assert (contributions <= c * (1 + 1e-6)).all() and (contributions >= c * (1 - 1e-5)).all()
    # bf16 per-image gradients are the fp32 ones to bf16 accuracy
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"], grads["32"], dim=1)
    assert (cosine > 0.99).all(), cosine


@pytest.mark.parametrize("k", [1, 2])
def test_clipped_sum_is_the_sum_of_clipped_per_image_means(k: int) -> None:
    """Per-image norms and the clipped sum equal a loop of per-image backward passes (UNet with attention and GroupNorm)."""
    b = 3
    reference = per_image_loop(b, k)
    names = [n for n, _ in tiny_unet().named_parameters()]
    assert any("attentions" in n for n in names) and any("norm" in n for n in names)
    norms = torch.stack([torch.cat([r[n].flatten() for n in names]).norm() for r in reference])
    c = float(norms.median())  # one image below the bound, one at it, one above
    d = dp(max_grad_norm=c, noise_multiplicity=k)
    den, opt = wrapped_step(d, b, k)
    torch.testing.assert_close(per_example_norms([p.grad_sample for p in den.trainable.parameters()]), norms, atol=0, rtol=1e-5)
    opt.step()
    factors = (c / (norms + 1e-6)).clamp(max=1.0)
    for name, p in den.trainable._module.named_parameters():
        expected = sum(f * r[name] for f, r in zip(factors, reference))
        torch.testing.assert_close(p.summed_grad, expected, atol=1e-6, rtol=1e-4, msg=name)
    assert opt.expected_batch_size == 8  # the update divides by the expected images, not B*K rows


# -- 3. Poisson sampling and empty batches -------------------------------------------------------------
def table(n: int) -> ImageTable:
    return ImageTable(torch.randint(0, 255, (n, 1, 8, 8), dtype=torch.uint8), torch.zeros(n), [f"t/{i}" for i in range(n)])


def test_poisson_batches_vary_in_size_at_the_accountants_rate() -> None:
    d = dp(n=50, batch_size=8)
    torch.manual_seed(0)
    loader = d.wrap_train_loader(DataLoader(table(50), batch_size=8, shuffle=True))
    assert loader.sample_rate == d.sample_rate == 8 / 50  # not 1/len(loader) = 1/7 (from_data_loader)
    sizes = [len(batch[0]) for _ in range(30) for batch in loader]
    assert len(set(sizes)) > 3 and 7 < sum(sizes) / len(sizes) < 9
    assert d.wrap_train_loader(loader) is loader


def test_an_empty_batch_takes_a_noise_only_step_that_is_counted() -> None:
    d = dp(n=50, batch_size=1)
    torch.manual_seed(0)
    loader = d.wrap_train_loader(DataLoader(table(50), batch_size=1))
    empty = next(b for _ in range(200) for b in loader if len(b[0]) == 0)
    assert empty[0].shape == (0, 1, 8, 8) and empty[2].shape == (0,)
    wrapped = d.wrap_model(tiny_unet())
    opt = d.wrap_optimizer(torch.optim.SGD(wrapped.parameters(), lr=1.0), wrapped)
    before = [p.detach().clone() for p in wrapped.parameters()]
    opt.zero_grad()  # the module returns no loss for an empty batch: no backward runs
    d.on_before_optimizer_step(wrapped)
    opt.step()
    assert d.steps == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, wrapped.parameters()))  # noise was added


def test_physical_batches_add_up_to_one_dp_step_per_poisson_batch() -> None:
    c = 0.1
    d = dp(n=40, batch_size=12, max_grad_norm=c, max_physical_batch_size=5)
    wrapped = d.wrap_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1)))
    opt = d.wrap_optimizer(torch.optim.SGD(wrapped.parameters(), lr=0.0), wrapped)
    reference = torch.nn.Linear(64, 1)
    reference.load_state_dict(wrapped._module[1].state_dict())
    data = table(40)
    torch.manual_seed(0)
    loader = d.wrap_train_loader(DataLoader(data, batch_size=12))
    rows, logical = [], 0
    for images, _, batch_rows in loader:
        assert len(images) <= 5
        before = d.steps
        opt.zero_grad()
        if len(images):
            wrapped(images).pow(2).mean().backward()
        d.on_before_optimizer_step(wrapped)
        opt.step()
        rows += batch_rows.tolist()
        if d.steps == before:
            continue
        expected = [torch.zeros_like(p) for p in reference.parameters()]
        for r in rows:  # each image's own gradient, clipped, summed over the whole Poisson batch
            reference.zero_grad()
            reference(data[r][0].flatten()).pow(2).mean().backward()
            g = [p.grad for p in reference.parameters()]
            f = min(1.0, c / (torch.cat([x.flatten() for x in g]).norm().item() + 1e-6))
            expected = [e + f * x for e, x in zip(expected, g)]
        for p, e in zip(wrapped._module[1].parameters(), expected):
            torch.testing.assert_close(p.summed_grad, e, atol=1e-6, rtol=1e-5)
        rows, logical = [], logical + 1
    assert d.steps == logical == int(1 / d.sample_rate) and not rows


# -- 4. accounting ----------------------------------------------------------------------------------
@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_equals_an_independent_opacus_accountant(accountant: str) -> None:
    d = dp(n=40, batch_size=8, noise_multiplier=1.3, accountant=accountant)
    wrapped = d.wrap_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1)))
    opt = d.wrap_optimizer(torch.optim.SGD(wrapped.parameters(), lr=0.1), wrapped)
    eps = []
    for _ in range(5):
        opt.zero_grad()
        wrapped(torch.randn(8, 4)).pow(2).mean().backward()
        d.on_before_optimizer_step(wrapped)
        opt.step()
        eps.append(d.metrics()["epsilon"])
    independent = create_accountant(accountant)
    for _ in range(5):
        independent.step(noise_multiplier=1.3, sample_rate=8 / 40)
    assert d.steps == 5
    assert abs(eps[-1] - independent.get_epsilon(delta=1e-5)) < 1e-6
    assert all(a < b for a, b in zip(eps, eps[1:]))  # epsilon grows with steps
    m = d.metrics()
    assert (m["accountant"], m["delta"], m["noise_multiplier"], m["sample_rate"]) == (accountant, 1e-5, 1.3, 0.2)
    assert "deduplicate before DP" in m["privacy_unit"]


# -- Lightning runs -----------------------------------------------------------------------------------
class BatchSizes(pl.Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.append(len(batch[0]))


def fit(tmp_path: Path, d: DPSGDDefense, batch_size: int, max_steps: int, ckpt_path: str | None = None, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    data = DiffusionDataModule(image_size=8, num_members=16, num_heldout=4, batch_size=batch_size, defenses=[d], run_dir=str(tmp_path))
    model = DiffusionModule(PixelDiffusion(image_size=8, block_out_channels=(8, 16), attention_levels=(1,)), warmup_steps=1, defenses=[d])
    sizes = BatchSizes()
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), callbacks=[sizes], limit_val_batches=0, **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, sizes.sizes


def test_lightning_counts_every_step_including_empty_batches(tmp_path) -> None:
    d = DPSGDDefense(noise_multiplier=1.0, accountant="rdp", noise_multiplicity=2)
    trainer, sizes = fit(tmp_path, d, batch_size=1, max_steps=10, enable_checkpointing=False)
    assert 0 in sizes  # q = 1/16: about a third of the Poisson batches are empty
    assert trainer.global_step == d.steps == 10


def test_lightning_trains_dp_sgd_in_bf16_mixed_precision_and_counts_its_steps(tmp_path) -> None:
    d = DPSGDDefense(noise_multiplier=1.0, accountant="rdp")
    trainer, sizes = fit(tmp_path, d, batch_size=4, max_steps=4, enable_checkpointing=False, precision="bf16-mixed")
    assert trainer.global_step == d.steps == 4 and d.epsilon() > 0
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_lightning_with_physical_batches_accounts_logical_steps(tmp_path) -> None:
    d = DPSGDDefense(noise_multiplier=1.0, accountant="rdp", max_physical_batch_size=3)
    trainer, sizes = fit(tmp_path, d, batch_size=8, max_steps=9, enable_checkpointing=False)
    assert max(sizes) <= 3 and trainer.global_step == 9  # Lightning counts physical batches
    assert 2 <= d.steps < 9  # the accountant counts Poisson batches (about 8 images each)


# -- 5. the budget ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs", [{"target_epsilon": 3.0, "steps": 4}, {"noise_multiplier": 1.0, "max_epsilon": 6.0}], ids=["target", "max"]
)
def test_a_budgeted_run_stops_before_exceeding_the_budget(tmp_path, kwargs) -> None:
    d = DPSGDDefense(accountant="rdp", **kwargs)
    budget = d.budget
    trainer, _ = fit(tmp_path, d, batch_size=4, max_steps=20, enable_checkpointing=False)
    assert 4 <= trainer.global_step == d.steps < 20
    assert d.epsilon() <= budget
    one_more = create_accountant("rdp")
    one_more.history = [(d.noise_multiplier, d.sample_rate, d.steps + 1)]
    assert one_more.get_epsilon(delta=1e-5) > budget
    assert "budget" in d.should_stop() and f"{budget:g}" in d.should_stop()


def test_resume_continues_the_accountant_history(tmp_path) -> None:
    d = DPSGDDefense(noise_multiplier=1.0, accountant="rdp")
    fit(tmp_path, d, batch_size=4, max_steps=3)
    ckpt = tmp_path / "checkpoints"
    last = sorted(ckpt.glob("*.ckpt"))[-1]
    saved = torch.load(last, weights_only=False)["defenses"]["dp_sgd"]
    assert saved["steps"] == 3
    resumed = DPSGDDefense(noise_multiplier=1.0, accountant="rdp")
    trainer, _ = fit(tmp_path, resumed, batch_size=4, max_steps=5, ckpt_path=str(last))
    assert trainer.global_step == resumed.steps == 5
    assert resumed.accountant.history == [(1.0, 4 / 16, 5)]  # neither reset nor counted twice


# -- 6. refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one of noise_multiplier and target_epsilon"),
        ({"noise_multiplier": 1.0, "target_epsilon": 8.0}, "exactly one of"),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": -1.0}, "max_grad_norm must be > 0, got -1.0"),
        ({"noise_multiplier": 1.0, "grad_sample_mode": "ghost"}, "ghost.*not supported"),
        ({"noise_multiplier": 1.0, "poisson_sampling": False}, "poisson_sampling=False is refused"),
        ({"noise_multiplier": 1.0, "noise_multiplicity": 0}, "noise_multiplicity must be an integer >= 1, got 0"),
    ],
)
def test_refuses_bad_settings(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DPSGDDefense(**kwargs)


@pytest.mark.parametrize(
    "trainer_kwargs,match",
    [({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0"), ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
     ({"precision": "16-true"}, "precision='16-true'.*32-true, or bf16-mixed"), ({"precision": "bf16-true"}, "precision='bf16-true'")],
)
def test_refuses_trainer_settings_it_cannot_honour(trainer_kwargs, match) -> None:
    trainer = pl.Trainer(logger=False, accelerator="cpu", max_steps=1, **trainer_kwargs)
    with pytest.raises(ValueError, match=match):
        dp().check_trainer(trainer)


def test_refuses_batchnorm_and_a_delta_above_one_over_n() -> None:
    with pytest.raises(ValueError, match="BatchNorm"):
        dp().wrap_model(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)))
    with pytest.raises(ValueError, match="delta=0.01 must be below 1/N"):
        DPSGDDefense(noise_multiplier=1.0, delta=0.01).on_data_ready(200, 8)


def test_refuses_a_checkpoint_with_other_privacy_settings_unless_new_budget() -> None:
    state = dp(noise_multiplier=1.0).state_dict()
    state["accountant"]["history"] = [[1.0, 0.2, 7]]
    with pytest.raises(ValueError, match="noise_multiplier 1 -> 2"):
        dp(noise_multiplier=2.0).load_state_dict(state)
    with pytest.raises(ValueError, match="sample rate"):
        dp(batch_size=4).load_state_dict(state)
    composed = dp(noise_multiplier=2.0, new_budget=True)
    composed.load_state_dict(state)
    assert composed.steps == 7  # the spent history is kept, never reset


# -- 7. the shipped config through the real CLI --------------------------------------------------------
def test_shipped_config_trains_logs_epsilon_and_a_resume_keeps_the_spent_budget(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    args = [
        "fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/defense/dp_sgd.yaml",
        "--run_dir", str(tmp_path), "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        "--data.num_members", "24", "--data.num_heldout", "8", "--data.batch_size", "16", "--audit", "null",
    ]
    cli = run_fit_cli([*args, "--trainer.max_steps", "3"])
    d = cli.model.defenses.find("dp_sgd")
    assert d is cli.datamodule.defenses.find("dp_sgd") and cli.trainer.global_step == d.steps == 3
    with open(tmp_path / "metrics.csv") as f:
        eps = [float(r["defense/dp_sgd/epsilon"]) for r in csv.DictReader(f) if r.get("defense/dp_sgd/epsilon")]
    assert len(eps) == 3 and 0 < eps[0] < eps[-1] <= d.target_epsilon
    # sigma was planned for 3 steps: the resumed run keeps the spent epsilon and stops at once.
    cli = run_fit_cli([*args, "--trainer.max_steps", "5", "--ckpt_path", "last"])
    resumed = cli.model.defenses.find("dp_sgd")
    assert resumed.steps == cli.trainer.global_step == 3
    assert resumed.noise_multiplier == d.noise_multiplier and resumed.epsilon() == pytest.approx(eps[-1])
    assert "budget" in resumed.should_stop()


def test_released_steps_a_resume_trains_again_are_counted_at_the_rate_they_ran_or_the_resume_is_refused() -> None:
    d = DPSGDDefense(noise_multiplier=1.0, accountant="rdp")
    assert d.account_redone(0) is None
    with pytest.raises(ValueError, match="holds no DP step"):
        d.account_redone(3)  # nothing tells at which sigma and sample rate the released steps ran
    d.accountant.history = [(1.0, 0.05, 9)]
    before = d.epsilon()
    assert "both runs are counted" in d.account_redone(3)
    assert d.steps == 12 and [tuple(h) for h in d.accountant.history][-1] == (1.0, 0.05, 3) and d.epsilon() > before
