"""The one-run audit of the DP-SGD step on the built-in digits: correct runs at several epsilons, and planted bugs.

    python scripts/audit_dp_step.py                        # eps 1, 4, 10 x 2 runs; 3 bugs at eps 1 and 4.5
    python scripts/audit_dp_step.py --steps 300 --repeats 3 --canaries 2000

Each run trains the quickstart UNet (configs/model/small.yaml) with DP-SGD through the CLI (`privdiff fit`, final
audit off) with m white-box gradient canaries, then runs `privdiff.eval.one_run.OneRunAudit` on what the run left
(defenses.json). A bug is planted with the test-only switches of tests/defenses/planted_dp_bugs.py. Prints one row
per run: the accountant's epsilon, the lower bound, bound / epsilon, the ceiling m allows, the verdict, and the DP
step time with and without canaries (the canaries' cost).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def planted_bugs():
    spec = importlib.util.spec_from_file_location("planted_dp_bugs", REPO / "tests" / "defenses" / "planted_dp_bugs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BUGS


def run(run_dir: Path, epsilon: float, steps: int, canaries: int, bug: str | None) -> tuple[dict | None, float]:
    """One DP-SGD fit through the CLI with ``canaries`` gradient canaries (and ``bug`` planted); its audit and time."""
    from privdiff.cli import run_fit_cli
    from privdiff.defenses.dp_sgd import DPSGDDefense
    from privdiff.eval.one_run import OneRunAudit

    original = DPSGDDefense.wrap_optimizer
    if bug is not None:
        apply = planted_bugs()[bug]

        def wrap_with_bug(self, optimizer, model):
            wrapped = original(self, optimizer, model)
            names = {id(p): n for n, p in model.named_parameters()}
            apply(wrapped, lambda name: "norm" in name, names)  # bypass: every GroupNorm left outside
            return wrapped

        DPSGDDefense.wrap_optimizer = wrap_with_bug
    args = ["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/model/small.yaml",
            "-c", "configs/defense/dp_sgd.yaml", "--audit", "null", "--periodic_audit", "null",
            "--trainer.enable_progress_bar", "false", "--trainer.max_steps", str(steps), "--run_dir", str(run_dir),
            "--data.defenses.init_args.target_epsilon", str(epsilon),
            "--data.defenses.init_args.gradient_canaries", str(canaries)]
    start = time.perf_counter()
    try:
        run_fit_cli(args)
    finally:
        DPSGDDefense.wrap_optimizer = original
    seconds = time.perf_counter() - start
    record = json.loads((run_dir / "defenses.json").read_text())
    found = OneRunAudit().run(SimpleNamespace(evidence=record.get("evidence", {})))
    return (found.summary if found else None), seconds


def main(steps: int = 100, repeats: int = 2, canaries: int = 1000, epsilons: Sequence[float] = (1.0, 4.0, 10.0),
         bug_epsilons: Sequence[float] = (1.0, 4.5)) -> None:
    """Run the correct and the planted-bug fits and print one row per run, then the canaries' cost.

    Args:
        steps: DP-SGD steps per fit
        repeats: correct runs per epsilon
        canaries: white-box gradient canaries per run
        epsilons: target epsilons of the correct runs
        bug_epsilons: target epsilons of each planted bug's runs
    """
    import os

    os.chdir(REPO)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plan = [(e, None, r) for e in epsilons for r in range(repeats)]
        plan += [(e, bug, 0) for bug in sorted(planted_bugs()) for e in bug_epsilons]
        for i, (epsilon, bug, r) in enumerate(plan):
            s, seconds = run(Path(tmp) / f"run{i}", epsilon, steps, canaries, bug)
            rows.append((epsilon, bug or "correct", r, s, seconds))
            print(f"  done {i + 1}/{len(plan)}: eps {epsilon:g} {bug or 'correct'} in {seconds:.0f} s", flush=True)
        # the canaries' cost: the same DP run without them and with them, interleaved
        costs = []
        for r in range(2):
            _, without = run(Path(tmp) / f"plain{r}", epsilons[0], steps, 0, None)
            _, with_them = run(Path(tmp) / f"canaries{r}", epsilons[0], steps, canaries, None)
            costs.append(with_them / without)
    print(f"\n{steps} DP steps of the quickstart UNet on the digits, {canaries} gradient canaries, 95% confidence")
    print(f"{'run':<26} {'accountant eps':>14} {'lower bound':>11} {'bound/eps':>9} {'ceiling':>8}  verdict")
    for epsilon, bug, r, s, seconds in rows:
        print(f"{bug + f' (eps {epsilon:g}, #{r})':<26} {s['claimed_epsilon']:>14.3g} {s['epsilon']:>11.3g} "
              f"{s['epsilon'] / s['claimed_epsilon']:>9.2f} {s['ceiling']:>8.3g}  {s['verdict']}  "
              f"({s['right']}/{s['guesses']} right, k+ {s['k_plus']}, k- {s['k_minus']}; {seconds:.0f} s)")
    print(f"fit time with {canaries} canaries / without (same eps, steps; 2 interleaved pairs): "
          + ", ".join(f"{c:.3f}" for c in costs) + " (the whole fit: start-up, data and export included)")


if __name__ == "__main__":
    from _cli import run_main  # scripts/_cli.py, beside this file

    run_main(main, __doc__)
