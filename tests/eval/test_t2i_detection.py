"""Text-to-image attacks' parts on an untrained tiny pipeline: the detection scores, Wen et al.'s prompt
mitigation as a generation-side defense, and captions under the report's grid of cases."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from privdiff.defenses.base import Defense, GenerationContext
from privdiff.defenses.prompt_mitigation import PromptMitigationDefense
from privdiff.eval.caption_scores import caption_scores, first_timesteps
from privdiff.eval.plugin import Cases
from privdiff.eval.sampling import generate
from privdiff.train.latent import LatentTextToImage

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TINY = dict(image_size=8, channels=1, vae_block_out_channels=(8, 16), block_out_channels=(8, 16), attention_head_dim=4,
            text_width=16, text_layers=1, vae_steps=0)
PROMPTS = ["a cat on a mat", "two dogs in the snow", "a cat on a mat", "an empty room"]


def tiny(seed: int = 0) -> LatentTextToImage:
    torch.manual_seed(seed)
    return LatentTextToImage(**TINY).eval()


def test_caption_scores_are_seeded_per_caption_and_count_their_calls() -> None:
    model = tiny()
    captions = ["a cat on a mat", "two dogs in the snow", "an empty room"]
    a = caption_scores(model, captions, seeds=3, first_steps=2, steps=10, seed=5)
    b = caption_scores(model, captions, seeds=3, first_steps=2, steps=10, seed=5, batch_size=4)  # other batching
    assert a.magnitude.shape == (3,) and a.one_step.shape == (3,)
    assert torch.allclose(a.magnitude, b.magnitude, atol=1e-5) and torch.allclose(a.one_step, b.one_step, atol=1e-5)
    assert a.calls == 2 * 3 * 3 * 2  # conditional + unconditional, per seed, per step, per caption
    assert (a.magnitude > 0).all() and (a.one_step <= 0).all()
    other = caption_scores(model, captions, seeds=3, first_steps=2, steps=10, seed=6)
    assert not torch.allclose(a.magnitude, other.magnitude)
    assert first_timesteps(1000, 50, 3) == [999, 979, 959]
    with pytest.raises(ValueError, match="seeds >= 2"):
        caption_scores(model, captions, seeds=1)


def test_a_caption_scored_once_in_an_audit_is_not_scored_again_and_scores_the_same_beside_any_other() -> None:
    model = tiny()
    cache: dict = {}
    kw = dict(seeds=3, first_steps=2, steps=10, seed=5)
    first = caption_scores(model, ["a cat on a mat", "an empty room"], cache=cache, **kw)
    assert first.calls == first.calls_spent == 2 * 2 * 3 * 2
    # the detection plugin scored two captions; the screen asks for one of them and a new one
    second = caption_scores(model, ["an empty room", "two dogs in the snow"], cache=cache, **kw)
    assert second.calls == 2 * 2 * 3 * 2 and second.calls_spent == 2 * 3 * 2
    assert second.magnitude[0] == first.magnitude[1] and second.one_step[0] == first.one_step[1]
    # a caption's noises are its own: scored alone, or among others, it gets the same score
    alone = caption_scores(model, ["two dogs in the snow"], **kw)
    assert torch.allclose(alone.magnitude, second.magnitude[1:], atol=1e-5)
    assert torch.allclose(alone.one_step, second.one_step[1:], atol=1e-5)
    # other settings are other scores, not cache hits
    other = caption_scores(model, ["an empty room"], cache=cache, **{**kw, "first_steps": 1})
    assert other.calls_spent == other.calls == 2 * 3


def test_prompt_mitigation_lowers_the_magnitude_and_leaves_prompts_under_the_target_alone() -> None:
    model = tiny()
    g = torch.Generator().manual_seed(3)
    untouched = PromptMitigationDefense(target=1e9)
    emb = untouched.adjust_condition(model, PROMPTS, g, GenerationContext())
    assert torch.equal(emb, model.condition_embedding(PROMPTS)) and untouched.adjusted == 0
    assert torch.equal(emb[0], emb[2])  # one embedding per distinct prompt
    # Sampling from an unchanged embedding gives the very images sampling from the captions gives: the
    # defense draws its probes from its own generator, never from the sampler's.
    plain = generate(model, 4, steps=3, prompts=PROMPTS, seed=0, progress=False)
    through = generate(model, 4, steps=3, prompts=PROMPTS, seed=0, progress=False, defenses=[PromptMitigationDefense(target=1e9)])
    assert torch.allclose(plain.images, through.images, atol=1e-6)

    strict = PromptMitigationDefense(target=1e-6, max_steps=5, probes=2)
    x = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.full((8,), 999, dtype=torch.long)
    with torch.no_grad():
        empty = model.predict_noise(x, t, model.condition_embedding([""] * 8)).float()
        before = strict._magnitude(model, model.condition_embedding(PROMPTS), empty, x, t)
    moved = strict.adjust_condition(model, PROMPTS, g, GenerationContext())
    with torch.no_grad():
        after = strict._magnitude(model, moved, empty, x, t)
    assert strict.adjusted == 3 and strict.steps_taken == 5 and strict.calls > 0
    assert after.mean() < before.mean()
    images = model.sample(4, steps=3, cond=moved, generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 8, 8)
    assert strict.metrics()["guarantee"].startswith("no DP guarantee")


def test_prompt_mitigation_takes_its_target_from_public_prompts_and_refuses_what_it_cannot_do() -> None:
    model = tiny()
    g = torch.Generator().manual_seed(0)
    d = PromptMitigationDefense(target_quantile=0.5)
    with pytest.raises(ValueError, match="held-out images"):
        d.adjust_condition(model, PROMPTS, g, GenerationContext())
    d.adjust_condition(model, PROMPTS, g, GenerationContext(public_prompts=["a red house", "a blue car", "a green tree"]))
    assert d.metrics()["target"] > 0
    with pytest.raises(ValueError, match="adjusts the prompts"):
        d.adjust_condition(model, torch.tensor([0, 1]), g, GenerationContext())
    assert d.acts_on_generation() and not Defense().acts_on_generation()
    d.check_model(model)
    with pytest.raises(ValueError, match="text-to-image model"):  # refused before training, not at the audit
        d.check_model(SimpleNamespace(conditioning="class"))
    with pytest.raises(ValueError, match="target must be > 0"):
        PromptMitigationDefense(target=-1.0)


def test_the_cases_grid_shows_the_caption_under_each_pair(tmp_path: Path) -> None:
    from privdiff.eval.audit import _save_cases
    from privdiff.eval.report import cases_figure, load_cases

    x = torch.rand(2, 1, 8, 8)
    _save_cases(tmp_path, [Cases(x, x, torch.tensor([0.01, 0.02]), ["m/1", "m/2"], ["prompt", "prompt"], [10, 10],
                                 ["a bold handwritten seven, leaning right, signed by the coral otter", "a thin one"])], (1, 8, 8))
    cases = load_cases(tmp_path)
    assert cases["captions"][1] == "a thin one"
    fig = cases_figure(cases)
    text = fig.axes[2].get_xlabel() + fig.axes[3].get_xlabel()
    assert "coral otter" in text and "prompted" in text


def test_a_verified_screen_is_the_full_searchs_draws_of_the_captions_it_passed() -> None:
    from privdiff.eval.prompt_extraction import _Search

    hit = {"image": 0, "distance": 0.03, "sample": 37}
    full = _Search([True, False, True, False], [hit, None, None, None], [True, False, True, False],
                   [{"pixel": 0.03}, {}, {}, {}], torch.zeros(64, 1, 8, 8), torch.arange(4).repeat_interleave(16), calls=4 * 16 * 25 + 100)  # 100: redraws
    screened = full.restricted([2, 0])
    assert screened.flagged == [True, True] and screened.confirmed == [None, hit] and screened.copies_member == [True, True]
    assert screened.by_space == [{}, {"pixel": 0.03}]
    assert screened.samples is full.samples  # the confirmed copy's sample index still points at its image
    assert screened.calls == round(full.calls / 2) and full.restricted([]).calls == 0


def test_the_detection_report_checks_its_premise_that_the_duplicated_images_are_not_generated_unprompted() -> None:
    from privdiff.eval.detection import MemorizationDetection
    from privdiff.eval.plugin import AuditContext, AuditData
    from privdiff.membership import ImageTable

    def table(captions: list[str], prefix: str) -> ImageTable:
        n = len(captions)
        return ImageTable(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8), torch.full((n,), -1),
                          [f"{prefix}/{i}" for i in range(n)], captions)

    torch.manual_seed(0)
    members = table(["a cat on a mat", "two dogs in the snow", "an empty room", "a red kite"], "m")
    calibration, heldout = table(["a blue door", "a tall tree", "a small boat"], "c"), table(["a green hat", "a cold lake"], "h")
    asked = []

    def sampler(prompts, seed, steps=None):
        # a model that, unprompted, gives the planted image 3 times, a single member once and a blank image 4 times
        asked.append((list(prompts), steps))
        x = members.unit()
        return SimpleNamespace(images=torch.cat([x[[0, 0, 0, 2]], torch.zeros(4, 1, 8, 8)]))

    def context(copies: torch.Tensor) -> AuditContext:
        return AuditContext(model=tiny(), data=AuditData(members, heldout, copies), samples=torch.zeros(0, 1, 8, 8),
                            calibration=calibration, heldout=heldout, flag_rate=0.34, sampler=sampler)

    plugin = MemorizationDetection(seeds=2, first_steps=1, steps=10, max_heldout=3, unconditional_samples=8)
    report = plugin.run(context(torch.tensor([6, 1, 1, 1])))  # one image planted 6x: 6 of 9 training rows
    s = report.summary
    assert asked == [([""] * 8, 10)]
    assert (s["training_rows"], s["duplicated_rows"], s["num_duplicated_captions"]) == (9, 6, 1)
    assert (s["unconditional"]["copy_duplicated"], s["unconditional"]["copy_any"]) == (3, 4)
    notes = " ".join(report.notes())
    assert "here 6 of 9, 67%" in notes and "8 samples for the empty prompt, 3 (38%) copy a duplicated member" in notes
    # no duplicated image: no AUC, nothing sampled, no premise to state
    asked.clear()
    plain = plugin.run(context(torch.ones(4, dtype=torch.long)))
    assert plain.summary["duplicated_rows"] == 0 and "unconditional" not in plain.summary and not asked
    assert len(plain.notes()) == 1


def test_a_delta_set_on_the_extraction_attack_reaches_detection_through_the_runner() -> None:
    """No plugin builds its own extraction attack: detection's copy criterion is the configured attack's."""
    from privdiff.eval.audit import AuditConfig, AuditData, run_audit
    from privdiff.eval.detection import MemorizationDetection
    from privdiff.eval.extraction import ExtractionAttack
    from privdiff.train.data import load_builtin

    pool = load_builtin("captioned_digits", 8, 1)
    members, heldout = pool.select(range(16)), pool.select(range(16, 56))
    copies = torch.ones(16, dtype=torch.long)
    copies[0] = 5
    detection = MemorizationDetection(seeds=2, first_steps=1, steps=2, max_heldout=4, unconditional_samples=4)
    for delta in (0.5, 0.05):
        config = AuditConfig(num_samples=4, steps=2, progress=False,
                             attacks={"extraction": ExtractionAttack(delta=delta), "detection": detection})
        found = run_audit(tiny(), AuditData(members, heldout, copies), config)["detection"]
        assert found["unconditional"]["delta"] == delta
