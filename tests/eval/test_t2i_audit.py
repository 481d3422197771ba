"""The text-to-image audit against planted ground truth: a tiny latent model over-trained on a few duplicated
image-caption pairs, the same model trained on the same data deduplicated (no duplicates left), and the tiny
pixel (Imagen-style) model over-trained on the captioned digits at 8x8.

Prompt extraction must recall the planted pairs (>= 90%) and flag no held-out caption; the detection
score must rank the planted captions above the rest; the screen must find the same set for fewer
noise-predictor calls; the model without duplicates must get nothing extracted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from privdiff.cli import run_fit_cli

REPO = Path(__file__).resolve().parents[2]
# Opt-in (`make test-t2i`): three trainings (1000 and 460 steps of batch 64, the pixel model's 400 of 32) and their audits take 15–18 min with 2 threads (6 min 36 s on a faster machine, 2026-12-02)
# here, on top of the ~16 min `make test` already takes in CI, whose whole run must stay under 30 minutes.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.skipif(os.environ.get("PRIVDIFF_T2I_ACCEPTANCE") != "1",
                       reason="text-to-image acceptance run: PRIVDIFF_T2I_ACCEPTANCE=1 (make test-t2i)"),
]

# The prompt-extraction screen scores with the detection plugin's settings (4 seeds, the first 10 of 25 steps,
# 40 calibration captions) and so reuses its scores; every caption is also searched without the screen.
AUDIT = """
audit:
  num_samples: 1
  steps: 50
  progress: false
  attacks:
    detection:
      class_path: privdiff.eval.detection.MemorizationDetection
      init_args: {seeds: 4, first_steps: 10, steps: 25, max_heldout: 40}
    prompt_extraction:
      class_path: privdiff.eval.prompt_extraction.PromptExtraction
      init_args: {samples_per_caption: 16, heldout_captions: 32, steps: 25, screen: one_step, screen_calibration: 40,
                  verify_screen: true}
"""


def _fit(tmp: Path, name: str, *extra: str) -> dict:
    audit = tmp / "audit.yaml"
    audit.write_text(AUDIT)
    run_dir = tmp / name
    # The earlier demo regime (64 members, 4 image-caption pairs planted 20x, 1000 steps of batch 64, 77 tokens: each pair seen ~8900
    # times, each single ~440) on a split of the digits nothing was chosen on: the demo is split 0, min_clique was
    # chosen on splits 0 and 3, this is split 7.
    args = ["fit", "-c", "configs/base.yaml", "-c", "configs/data/captioned_digits.yaml", "-c", "configs/model/t2i_tiny.yaml",
            "-c", str(audit), "--data.num_heldout", "200", "--data.duplicate_copies", "20", "--data.seed", "7",
            "--model.diffusion.init_args.vae_steps", "200", "--trainer.max_steps", "1000",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
            "--run_dir", str(run_dir), *extra]
    run_fit_cli(args)
    return json.loads((run_dir / "audit.json").read_text())


@pytest.fixture(scope="module")
def audits(tmp_path_factory) -> dict[str, dict]:
    import torch

    tmp = tmp_path_factory.mktemp("t2i_audit")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(REPO)
    torch.set_num_threads(2)  # other test modules pin one thread at import; the figures in README are at two
    try:
        # The same data deduplicated: the model sees each of the 64 images once per epoch, for as many epochs.
        return {"planted": _fit(tmp, "planted"),
                "no_duplicates": _fit(tmp, "no_duplicates", "-c", "configs/defense/dedup.yaml", "--trainer.max_steps", "460")}
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def test_prompt_extraction_recalls_the_planted_pairs_and_flags_no_heldout_caption(audits) -> None:
    found = audits["planted"]["prompt_extraction"]
    screen = found["screen"]
    print("planted:", {k: found[k] for k in ("planted", "planted_found", "extracted", "heldout_flagged", "heldout_copies_member")},
          {k: screen.get(k) for k in ("passed", "candidates", "calls", "unscreened_calls", "unscreened_extracted",
                                      "unscreened_planted_found", "same_set", "missed")})
    assert found["planted"] == 4
    # The attack itself (every caption searched) recalls the planted pairs and nothing held out.
    assert screen["unscreened_planted_found"] / found["planted"] >= 0.9
    assert found["heldout_flagged"] == 0
    # What it recovers are the duplicated pairs.
    assert screen["unscreened_extracted"] == screen["unscreened_planted_found"]
    assert all(r["rows"] == 20 for r in found["records"])
    # The records (and the report's grid) show every pair the full search recovered, marked if the screen found it too.
    assert len(found["records"]) == screen["unscreened_extracted"]
    assert sum(r["screened"] for r in found["records"]) == found["extracted"]
    # The screen samples fewer captions for fewer calls, and what it extracts the full search extracts too.
    assert screen["passed"] < screen["candidates"] and screen["calls"] < screen["unscreened_calls"]
    assert found["extracted"] == screen["unscreened_extracted"] - screen["missed"]


def test_the_detection_score_ranks_the_planted_captions_above_the_rest(audits) -> None:
    detection = audits["planted"]["detection"]
    aucs = {k: detection[k]["auc_duplicated_vs_rest"] for k in ("magnitude", "one_step")}
    print("detection AUC:", aucs)
    # Neither score alone cleared 0.8 on every split measured (2026-12-01, 4 planted captions against ~100 others):
    # Webster's consistency 0.885 / 0.87 / 0.725 and Wen et al.'s magnitude 0.908 / 0.55 / 0.983 on splits 0 / 3 / 7.
    # A tiny model maps a planted caption to a mixture of the planted images (the consistency suffers) and, with the
    # planted rows half of the data, generates them unconditionally too (the magnitude suffers). The audit reports
    # both; what must hold is that at least one of them separates the planted captions and flags some of them.
    best = max(aucs, key=lambda k: aucs[k])
    assert aucs[best] >= 0.8
    assert detection[best]["duplicated_flagged"] >= 1


def test_a_model_trained_on_no_duplicates_gets_nothing_flagged(audits) -> None:
    found = audits["no_duplicates"]["prompt_extraction"]
    print("no duplicates:", {k: found[k] for k in ("extracted", "heldout_flagged", "heldout_copies_member")},
          found["screen"].get("unscreened_extracted"))
    assert audits["no_duplicates"]["data"]["removed_by_defenses"] > 0
    assert found["planted"] == 0 and found["planted_recall"] is None
    assert found["extracted"] == 0 and found["screen"]["unscreened_extracted"] == 0 and found["heldout_flagged"] == 0
    assert audits["no_duplicates"]["detection"]["one_step"]["auc_duplicated_vs_rest"] is None


# -- the pixel text-to-image model ---------------------------------------------------------------
# Every caption sampled (no screen): the 8 most duplicated member captions (the 4 planted ones first) and 16 held-out.
PIXEL_AUDIT = """
audit:
  num_samples: 1
  steps: 20
  progress: false
  attacks:
    prompt_extraction:
      class_path: privdiff.eval.prompt_extraction.PromptExtraction
      init_args: {samples_per_caption: 12, heldout_captions: 16, max_captions: 8, steps: 20, screen: none}
"""


def test_prompt_extraction_recalls_the_planted_pairs_of_a_pixel_model_and_flags_no_heldout_caption(tmp_path, monkeypatch) -> None:
    import torch

    monkeypatch.chdir(REPO)
    (tmp_path / "audit.yaml").write_text(PIXEL_AUDIT)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # 32 members, 4 image-caption pairs planted 20x, 400 steps of 32 (split 3; the same regime on split 7 with 64
        # members, 600 steps of 64 and every caption searched found 4 of 4 too: docs/benchmarks.md).
        run_fit_cli(["fit", "-c", "configs/base.yaml", "-c", "configs/data/captioned_digits.yaml", "-c", "configs/model/t2i_pixel_tiny.yaml",
                     "-c", str(tmp_path / "audit.yaml"), "--data.image_size", "8", "--data.num_members", "32", "--data.num_heldout", "100",
                     "--data.duplicate_copies", "20", "--data.batch_size", "32", "--data.seed", "3", "--trainer.max_steps", "400",
                     "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
                     "--run_dir", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(threads)
    found = json.loads((tmp_path / "run" / "audit.json").read_text())["prompt_extraction"]
    print({k: found[k] for k in ("planted", "planted_found", "extracted", "heldout_flagged", "heldout_copies_member")})
    assert found["planted"] == 4
    assert found["planted_found"] / found["planted"] >= 0.9
    assert found["heldout_flagged"] == 0
    assert all(r["rows"] == 20 for r in found["records"])  # what it recovers are the duplicated pairs
