"""The report's view of the audit through training: its figure and its notes, read from ``audit.json``'s trajectory.

Kept apart from :mod:`privdiff.eval.periodic` (the callback, which runs audits) so that the report reads trajectories
without importing the audit runner that imports the report.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["tradeoff_figure", "trajectory_figure", "trajectory_notes"]


def trajectory_figure(runs: Mapping[str, Mapping[str, Any]]):
    """Utility and memorization against the training step, one column per setting that was audited through training.

    Top: FID (lower is better) and the selected step (a star). Bottom: images extracted beside the control's 95%
    interval of chance (shaded), and the loss attack's MIA AUC. A dashed line marks the first step where extraction
    is above chance. None when no setting has a trajectory.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracked = {name: audit["trajectory"] for name, audit in runs.items() if (audit.get("trajectory") or {}).get("points")}
    if not tracked:
        return None
    fig, axes = plt.subplots(2, len(tracked), figsize=(3.4 * len(tracked) + 0.8, 5.2), layout="constrained", squeeze=False,
                             sharex="col")
    for col, (name, trajectory) in enumerate(tracked.items()):
        points = trajectory["points"]
        steps = [p["step"] for p in points]
        top, bottom = axes[0][col], axes[1][col]
        fid = [p["fid"] if p["fid"] is not None else float("nan") for p in points]
        top.plot(steps, fid, "o-", color="C0", ms=3, label="FID")
        selected = trajectory.get("selected")
        if selected:
            at = next(p for p in points if p["step"] == selected["step"])
            top.plot([at["step"]], [at["fid"]], "*", color="C2", ms=13, label=f"selected (step {at['step']})")
        top.set_title(name, fontsize=9)
        top.grid(alpha=0.3)
        top.legend(fontsize=7)
        extracted = [p["extracted"] if p["extracted"] is not None else float("nan") for p in points]
        low = [(p.get("chance_interval") or [0, 0])[0] for p in points]
        high = [(p.get("chance_interval") or [0, 0])[1] for p in points]
        bottom.fill_between(steps, low, high, color="0.8", label="chance (95%)")
        bottom.plot(steps, extracted, "s-", color="C3", ms=3, label="extracted")
        if any("prompt_extraction" in p for p in points):
            found = [(p.get("prompt_extraction") or {}).get("planted_found") for p in points]
            bottom.plot(steps, [f if f is not None else float("nan") for f in found], "d-", color="C1", ms=3,
                        label="planted pairs (prompt)")
        first = trajectory.get("first_above_chance")
        for ax in (top, bottom):
            if first is not None:
                ax.axvline(first, color="C3", ls="--", lw=1)
        if first is not None:
            bottom.annotate(f"above chance from step {first}", (first, max(e for e in extracted if e == e)), fontsize=7,
                            xytext=(3, -10), textcoords="offset points")
        auc = [p["mia_auc"] for p in points]
        if any(a is not None for a in auc):
            twin = bottom.twinx()
            twin.plot(steps, [a if a is not None else float("nan") for a in auc], "^:", color="C4", ms=3, label="MIA AUC (loss)")
            twin.set_ylim(0.3, 1.0)
            twin.tick_params(labelsize=7)
            if col == len(tracked) - 1:
                twin.set_ylabel("MIA AUC", fontsize=8)
            lines, labels = bottom.get_legend_handles_labels()
            more, more_labels = twin.get_legend_handles_labels()
            bottom.legend(lines + more, labels + more_labels, fontsize=7, loc="upper left")
        else:
            bottom.legend(fontsize=7, loc="upper left")
        bottom.set_xlabel("training step", fontsize=8)
        bottom.grid(alpha=0.3)
        if col == 0:
            top.set_ylabel("FID (lower = better)", fontsize=8)
            bottom.set_ylabel("images extracted", fontsize=8)
    fig.suptitle("memorization through training (the periodic audit)", fontsize=10)
    return fig


def tradeoff_figure(runs: Mapping[str, Mapping[str, Any]]):
    """Utility against memorization along training: one line per audited setting through its checkpoints.

    x: FID (lower = better, the axis runs right to better); y: images extracted beyond the control's chance count.
    Each line starts at the setting's first audit and its points are labelled by step at both ends, so a model
    that gets more useful as it trains and memorizes more climbs to the right. None without a trajectory.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracked = {name: audit["trajectory"]["points"] for name, audit in runs.items()
               if any(p.get("fid") is not None for p in (audit.get("trajectory") or {}).get("points") or [])}
    if not tracked:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.8), layout="constrained")
    for i, (name, points) in enumerate(tracked.items()):
        points = [p for p in points if p.get("fid") is not None and p.get("extracted") is not None]
        fid = [p["fid"] for p in points]
        beyond = [p["extracted"] - (p.get("chance") or 0.0) for p in points]
        ax.plot(fid, beyond, "o-", color=f"C{i}", ms=3.5, lw=1.2, label=name)
        for p, x, y in ((points[0], fid[0], beyond[0]), (points[-1], fid[-1], beyond[-1])):
            ax.annotate(str(p["step"]), (x, y), fontsize=7, color=f"C{i}", xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.invert_xaxis()
    ax.set_xlabel("FID (lower = better; better to the right)", fontsize=8)
    ax.set_ylabel("images extracted minus chance", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("utility and memorization through training (labels: steps)", fontsize=9)
    return fig


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def trajectory_notes(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What the report says of each trajectory: the first step above chance, the checkpoint chosen and why, the cost."""
    notes = []
    for name, audit in runs.items():
        t = audit.get("trajectory") or {}
        points = t.get("points") or []
        if not points:
            continue
        profile = t["profile"]
        text = (f"{name}: audited every {t['every_n_steps']} steps ({len(points)} audits of {profile['num_samples']} samples "
                f"at {profile['steps']} sampler steps on the EMA weights)")
        share = t.get("audit_share")
        if share is not None:
            text += f", {t['audit_seconds']:.0f} s, {share:.0%} of the training's wall time"
        first = t.get("first_above_chance")
        text += (f"; extraction first above chance at step {first}." if first is not None
                 else "; extraction never above chance.")
        selected = t.get("selected")
        if selected:
            at = next(p for p in points if p["step"] == selected["step"])
            fid = f"FID {at['fid']:.3g}" if at.get("fid") is not None else "no FID"
            text += (f" Exported as selected/: step {selected['step']} ({fid}, {at['extracted']} extracted against chance "
                     f"{at['chance']:.1f}), {selected['reason']}.")
            if (audit.get("privacy") or {}).get("guarantees"):
                text += (" The choice read the members (extraction and MIA compare with them, FID's real images hold them "
                         "unless the profile's quality has real: heldout): it is outside the run's ε.")
        elif t.get("rule"):
            text += " No audited checkpoint was within the selection rule's limits: nothing exported as selected/."
        prompt = [p for p in points if (p.get("prompt_extraction") or {}).get("planted")]
        if prompt:
            found = next((p["step"] for p in prompt if p["prompt_extraction"]["planted_found"]), None)
            text += (f" Prompt extraction first confirms a planted pair at step {found}." if found is not None
                     else " Prompt extraction confirms no planted pair at any audited step.")
        for kind in ("one_step", "magnitude"):
            scored = [p for p in points if (p.get(f"detection_{kind}") or {}).get("planted_mean") is not None]
            if scored:
                text += (f" Detection ({kind}), planted captions' mean score / held-out captions' mean by step: "
                         + ", ".join(f"{p['step']}: {_g(p[f'detection_{kind}']['planted_mean'])}/"
                                     f"{_g(p[f'detection_{kind}']['heldout_mean'])}" for p in scored) + ".")
        if t.get("stopped_early"):
            text += " Training stopped early: the memorization budget was spent."
        notes.append(text)
    return notes
