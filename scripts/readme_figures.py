"""The README's figures of the audit through training, from a comparison's audits.

    python scripts/readme_figures.py runs/quickstart quickstart   # after `make demo`
    python scripts/readme_figures.py runs/scale scale             # after `privdiff compare -c configs/compare/scale.yaml`

Reads ``<out_dir>/<setting>/audit.json`` of every setting and writes ``scripts/figures/<name>_trajectory.png`` (FID,
extraction and MIA against the step) and ``scripts/figures/<name>_tradeoff.png`` (FID against extraction beyond chance);
where the runs had input canaries (``configs/compare/canaries.yaml``), ``scripts/figures/<name>_canaries.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from privdiff.eval.one_run import CanaryAudit
    from privdiff.eval.trajectory import tradeoff_figure, trajectory_figure

    out_dir, name = Path(sys.argv[1]), sys.argv[2]
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(out_dir.glob("*/audit.json"))}
    target = REPO / "scripts" / "figures"
    canaries = CanaryAudit.figures(runs)
    figures = (("trajectory", trajectory_figure(runs)), ("tradeoff", tradeoff_figure(runs)),
               ("canaries", canaries[0][1] if canaries else None))
    for kind, figure in figures:
        if figure is None:
            print(f"no {kind} figure: no setting of {out_dir} was audited through training")
            continue
        path = target / f"{name}_{kind}.png"
        figure.savefig(path, dpi=110)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
