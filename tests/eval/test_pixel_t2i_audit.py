"""The pixel text-to-image model against planted ground truth: the tiny Imagen-style model over-trained on a few
duplicated image-caption pairs of the captioned digits (8x8, their native size), audited by prompt extraction.

Prompt extraction must recall the planted pairs (>= 90%) and flag no held-out caption.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from privdiff.cli import run_fit_cli

REPO = Path(__file__).resolve().parents[2]
# Opt-in with the latent model's acceptance run (`make test-t2i`): a training of 400 steps and its audit.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.skipif(os.environ.get("PRIVDIFF_T2I_ACCEPTANCE") != "1",
                       reason="text-to-image acceptance run: PRIVDIFF_T2I_ACCEPTANCE=1 (make test-t2i)"),
]

# Every caption sampled (no screen): the 8 most duplicated member captions (the 4 planted ones first) and 16 held-out.
AUDIT = """
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
    (tmp_path / "audit.yaml").write_text(AUDIT)
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
