"""The text-to-image audit against planted ground truth: a tiny latent model over-trained on a few duplicated
image-caption pairs, and the same model trained on the same data deduplicated (no duplicates left).

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
# Opt-in (`make test-t2i`): two trainings of ~1000 steps take 11 min with 2 threads here (20 min at the one thread
# the suite runs with), which `make test` cannot afford under CI's 30 minutes; and the recall is not stable
# enough to gate CI on: 4/4 planted pairs with 2 threads, 3/4 with 1 thread on the same seeds (2026-12-01).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.skipif(os.environ.get("PRIVDIFF_T2I_ACCEPTANCE") != "1",
                       reason="text-to-image acceptance run: PRIVDIFF_T2I_ACCEPTANCE=1 (make test-t2i)"),
]

AUDIT = """
audit:
  num_samples: 1
  steps: 50
  progress: false
  attacks:
    detection:
      class_path: privdiff.eval.detection.MemorizationDetection
      init_args: {seeds: 4, first_steps: 10}
    prompt_extraction:
      class_path: privdiff.eval.prompt_extraction.PromptExtraction
      init_args: {samples_per_caption: 16, min_clique: 5, heldout_captions: 16, steps: 25, screen: one_step, verify_screen: true}
"""


def _fit(tmp: Path, name: str, *extra: str) -> dict:
    audit = tmp / "audit.yaml"
    audit.write_text(AUDIT)
    run_dir = tmp / name
    # Over-trained on the planted pairs, on a split of the digits no setting was chosen on (seed 3): 64 members,
    # 4 image-caption pairs planted 20x, 1000 steps (each pair seen ~9000 times, each single ~460 times).
    args = ["fit", "-c", "configs/base.yaml", "-c", "configs/data/captioned_digits.yaml", "-c", "configs/model/t2i_tiny.yaml",
            "-c", str(audit), "--data.num_heldout", "200", "--data.duplicate_copies", "20", "--data.seed", "3",
            "--model.diffusion.init_args.vae_steps", "200", "--trainer.max_steps", "1000", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false", "--run_dir", str(run_dir), *extra]
    run_fit_cli(args)
    return json.loads((run_dir / "audit.json").read_text())


@pytest.fixture(scope="module")
def audits(tmp_path_factory) -> dict[str, dict]:
    import torch

    tmp = tmp_path_factory.mktemp("t2i_audit")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(REPO)
    torch.set_num_threads(2)  # other test modules pin one thread at import; the figures above are at two
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
    # The screen samples fewer captions for fewer calls, and what it extracts the full search extracts too.
    assert screen["passed"] < screen["candidates"] and screen["calls"] < screen["unscreened_calls"]
    assert found["extracted"] == screen["unscreened_extracted"] - screen["missed"]


def test_the_detection_score_ranks_the_planted_captions_above_the_rest(audits) -> None:
    detection = audits["planted"]["detection"]
    print("detection AUC:", {k: detection[k]["auc_duplicated_vs_rest"] for k in ("magnitude", "one_step")})
    # Webster's consistency (the score the screen uses); Wen et al.'s magnitude is reported beside it: on this
    # split it hardly separates (0.55 measured), on the demo's split it did (0.95).
    assert detection["one_step"]["auc_duplicated_vs_rest"] >= 0.8
    assert detection["one_step"]["duplicated_flagged"] >= 1


def test_a_model_trained_on_no_duplicates_gets_nothing_flagged(audits) -> None:
    found = audits["no_duplicates"]["prompt_extraction"]
    print("no duplicates:", {k: found[k] for k in ("extracted", "heldout_flagged", "heldout_copies_member")},
          found["screen"].get("unscreened_extracted"))
    assert audits["no_duplicates"]["data"]["removed_by_defenses"] > 0
    assert found["planted"] == 0 and found["planted_recall"] is None
    assert found["extracted"] == 0 and found["screen"]["unscreened_extracted"] == 0 and found["heldout_flagged"] == 0
    assert audits["no_duplicates"]["detection"]["one_step"]["auc_duplicated_vs_rest"] is None
