"""Does a trained text-to-image run reproduce its training images when prompted with their captions?

    python scripts/t2i_prompted_copies.py --run runs/t2i/none [--seeds 8] [--captions 16]

Prompts the run's exported model (``<run>/model``) with three kinds of caption, ``--seeds``
generations each (the audit's ancestral sampler): the captions of the planted duplicated
image-caption pairs, captions of members seen once, and captions of held-out images (never
trained on). For each generation it measures, with the audit's distances on [0, 1] pixels
(Carlini et al. 2023 l2): the l2 to the training image of its caption, the l2 to the nearest
member, whether that nearest member is the caption's own image, and whether it is a planted one. The copy threshold is the
audit's calibrated one: the l2 under which at most 1% of held-out images lie from a member.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import torch

from privdiff.distances import l2, nearest_neighbors
from privdiff.eval.audit import load_audit_data
from privdiff.eval.sampling import generate
from privdiff.eval.thresholds import calibrate, split_heldout
from privdiff.membership import Manifest
from privdiff.train.models import load_model


def main(run: Path, seeds: int = 8, captions: int = 16, steps: int = 50, threads: int = 2) -> None:
    """Prompt the run's model with its planted, singleton-member and held-out captions; print one row per group.

    Args:
        run: a run directory of `privdiff fit` (model/, manifest.json)
        seeds: generations per caption
        captions: singleton member captions and held-out captions to try
        steps: steps of the ancestral sampler
        threads: torch CPU threads
    """
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    model = load_model(run / "model").eval()
    data = load_audit_data(Manifest.load(run / "manifest.json"))
    members, heldout = data.members, data.heldout
    if members.captions is None or heldout.captions is None:
        raise SystemExit(f"{run} was not trained on captioned data")
    reference = members.unit()
    calibration_rows, evaluation_rows = split_heldout(len(heldout), seed=0)
    calibration = nearest_neighbors(heldout.unit()[calibration_rows], reference).distances[:, 0]
    threshold = calibrate("l2", calibration, 0.01, inclusive=True)
    planted = [i for i in range(len(members)) if int(data.copies[i]) > 1]
    singles = [i for i in range(len(members)) if int(data.copies[i]) == 1][: captions]
    held = evaluation_rows[: captions].tolist()
    groups = {"planted duplicated pairs": ("member", planted), "members seen once": ("member", singles), "held-out captions": ("heldout", held)}
    print(f"run {run}: {len(members)} members ({len(planted)} planted x copies {data.copies[planted].tolist()}), "
          f"copy threshold l2 <= {threshold.value:.4f} (1% of {threshold.num_calibration} held-out images)")
    print(f"{'captions':28s} {'n':>3s} {'own l2 (median)':>16s} {'nearest l2 (median)':>20s} {'own nearest':>12s} {'nearest planted':>16s} {'copies (l2<=thr)':>17s}")
    start = time.perf_counter()
    for name, (table_name, rows) in groups.items():
        table = members if table_name == "member" else heldout
        prompts = [table.captions[r] for r in rows for _ in range(seeds)]
        images = generate(model, len(prompts), solver="ancestral", steps=steps, prompts=prompts, seed=1, progress=False).images
        own = table.unit()[torch.tensor(rows).repeat_interleave(seeds)]
        own_l2 = l2(images, own)
        near = nearest_neighbors(images, reference)
        nearest_l2, nearest_row = near.distances[:, 0], near.indices[:, 0]
        own_nearest = (nearest_row == torch.tensor(rows).repeat_interleave(seeds)) if table_name == "member" else None
        copies = nearest_l2 <= threshold.value
        of_planted = torch.isin(nearest_row, torch.tensor(planted))
        per_caption = copies.view(len(rows), seeds).any(1)
        print(f"{name:28s} {len(rows):3d} {statistics.median(own_l2.tolist()):16.3f} {statistics.median(nearest_l2.tolist()):20.3f} "
              f"{'-' if own_nearest is None else f'{float(own_nearest.float().mean()):.0%}':>12s} {float(of_planted.float().mean()):16.0%} "
              f"{int(copies.sum())}/{len(copies)} ({int(per_caption.sum())}/{len(rows)} captions)")
    print(f"sampling and distances: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    from _cli import run_main  # scripts/_cli.py, beside this file

    run_main(main, __doc__)
