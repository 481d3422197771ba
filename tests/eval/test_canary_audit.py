"""The black-box one-run audit from input canaries: a model that knows its trained-on canaries is caught above a
small claimed epsilon, a model that knows nothing is not, and a run with no canaries gets no column."""

from __future__ import annotations

import torch

from privdiff.eval.one_run import CanaryAudit
from privdiff.eval.plugin import AuditContext, AuditData
from privdiff.train.canaries import builtin_canaries
from privdiff.train.data import load_builtin
from privdiff.train.denoiser import build_scheduler

from .test_mia import MemberOracle, tiny_denoiser


class PixelOracle(MemberOracle):
    """Knows the included canaries exactly (pixels in [0, 1] map to [-1, 1], as the pixel model's encode)."""

    image_shape = property(lambda self: (1, 8, 8))

    def encode(self, images):
        return images * 2 - 1


def context(model, included: torch.Tensor, claimed: dict | None = None) -> AuditContext:
    digits = load_builtin("digits", 8, 1)
    canaries = builtin_canaries(len(included), 8, 1)
    data = AuditData(digits.select(range(16)), digits.select(range(16, 32)), torch.ones(16, dtype=torch.long),
                     canaries=canaries, canary_included=included)
    return AuditContext(model, data, torch.empty(0, 1, 8, 8), claimed=claimed or {})


def test_a_model_that_knows_its_canaries_violates_a_small_claim_and_one_that_knows_nothing_does_not() -> None:
    included = torch.rand(200, generator=torch.Generator().manual_seed(0)) < 0.5
    canaries = builtin_canaries(200, 8, 1).unit() * 2 - 1
    oracle = PixelOracle(canaries[included], build_scheduler(), radius=2.5)
    plugin = CanaryAudit(loss_timesteps=[50], noise_draws=1, pia_t=None)
    leaky = plugin.run(context(oracle, included, {"epsilon": 1.0, "delta": 1e-5, "holds": True})).summary
    assert leaky["verdict"] == "VIOLATED" and leaky["epsilon"] > 2.0, leaky["epsilon"]
    assert leaky["right"] == leaky["guesses"] and leaky["m"] == 200
    assert leaky["epsilon"] <= leaky["ceiling"] + 1e-9
    undefended = plugin.run(context(oracle, included)).summary
    assert undefended["verdict"].startswith("no DP claim") and undefended["claimed_epsilon"] is None
    assert undefended["epsilon"] == leaky["epsilon"]  # the same evidence, read without a claim

    blind = CanaryAudit(loss_timesteps=[50, 200], noise_draws=2).run(
        context(tiny_denoiser(), included, {"epsilon": 1.0, "delta": 1e-5, "holds": True})).summary
    assert blind["epsilon"] == 0.0 and blind["verdict"] == "consistent"
    assert blind["choices"] == 2 * leaky["choices"]  # four scores against two: every one is paid for in the union bound


def test_a_run_without_canaries_gets_no_result() -> None:
    digits = load_builtin("digits", 8, 1)
    data = AuditData(digits.select(range(16)), digits.select(range(16, 32)), torch.ones(16, dtype=torch.long))
    assert CanaryAudit().run(AuditContext(tiny_denoiser(), data, torch.empty(0, 1, 8, 8))) is None


def test_a_text_to_image_model_is_scored_with_each_canarys_own_caption() -> None:
    from tests.train.test_latent import tiny

    model = tiny()
    captions_seen: list[str] = []
    embed = model.embed_condition

    def spy(cond):
        captions_seen.extend(cond)
        return embed(cond)

    model.embed_condition = spy
    canaries = builtin_canaries(12, 8, 1, captioned=True)
    digits = load_builtin("captioned_digits", 8, 1)
    data = AuditData(digits.select(range(8)), digits.select(range(8, 16)), torch.ones(8, dtype=torch.long),
                     canaries=canaries, canary_included=torch.arange(12) % 2 == 0)
    found = CanaryAudit(loss_timesteps=[50], noise_draws=1).run(AuditContext(model, data, torch.empty(0, 1, 8, 8)))
    assert found is not None and found.summary["m"] == 12
    assert set(captions_seen) == set(canaries.captions)  # the caption, never another's or none
