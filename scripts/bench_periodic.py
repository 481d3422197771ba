"""The periodic audit's cost: its share of the training's wall time, on the demo's `none` setting.

    python scripts/bench_periodic.py                  # the demo: 800 steps, audited every 100
    python scripts/bench_periodic.py --steps 200 --every 50

Trains the same setting twice in this process, one thread each (as ``make demo`` runs two settings side by side on
2 cores): once without the periodic audit and once with it, and prints both wall times, their ratio and the audits'
share as the run itself measured it. The final audit is off in both.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def fit(run_dir: Path, steps: int, every: int | None, threads: int) -> float:
    from privdiff.cli import run_fit_cli

    torch.set_num_threads(threads)
    args = ["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/model/small.yaml",
            "-c", "configs/audit/quickstart.yaml", "--audit", "null", "--trainer.enable_progress_bar", "false",
            "--trainer.max_steps", str(steps), "--run_dir", str(run_dir)]
    args += ["--periodic_audit", "null"] if every is None else ["--periodic_audit.every_n_steps", str(every)]
    start = time.perf_counter()
    run_fit_cli(args)
    return time.perf_counter() - start


def main(steps: int = 800, every: int = 100, threads: int = 1) -> None:
    """Fit the demo's `none` setting without and with the periodic audit and print both wall times.

    Args:
        steps: training steps of each fit
        every: steps between two periodic audits
        threads: torch CPU threads of each fit
    """
    import os

    os.chdir(REPO)
    with tempfile.TemporaryDirectory() as tmp:
        plain = fit(Path(tmp) / "plain", steps, None, threads)
        audited = fit(Path(tmp) / "audited", steps, every, threads)
        t = json.loads((Path(tmp) / "audited" / "trajectory.json").read_text())
    print(f"\n{steps} steps, audited every {every} ({len(t['points'])} audits of {t['profile']['num_samples']} samples), "
          f"{threads} thread(s)")
    print(f"  fit without the periodic audit: {plain:7.1f} s")
    print(f"  fit with it:                    {audited:7.1f} s   ratio {audited / plain:.2f}x")
    print(f"  the audits, as the run measured them: {t['audit_seconds']:.1f} s = {t['audit_share']:.0%} of its training's wall time")
    print(f"  first step above chance: {t['first_above_chance']}; selected: {t['selected']}")


if __name__ == "__main__":
    from _cli import run_main  # scripts/_cli.py, beside this file

    run_main(main, __doc__)
