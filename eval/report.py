"""Reports of one run or a comparison: ``report.json`` (versioned, with units), ``report.md`` and a
self-contained ``report.html`` with the privacy-utility figures and the most-extracted cases."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping

REPORT_SCHEMA = "privdiff.report/1"

# column key -> (header, unit). Units go into report.json so that every number says what it is.
COLUMNS: dict[str, tuple[str, str]] = {
    "setting": ("setting", ""),
    "defense": ("defense", ""),
    "epsilon": ("ε (δ, accountant)", "epsilon spent, of (epsilon, delta)-DP, by the named Opacus accountant; 'none' without DP-SGD"),
    "fid": ("FID", "Fréchet distance in the named backbone's feature space (lower is better)"),
    "kid": ("KID", "kernel inception distance, mean ± std over subsets"),
    "extracted": ("extracted", "unique member images extracted (count, % of members)"),
    "nn_memorized": ("NN-ratio mem.", "fraction of samples with nearest/second-nearest member l2 < 1/3"),
    "mia": ("best MIA AUC", "ROC AUC of the strongest attack, members vs held-out"),
    "tpr": ("TPR@1%FPR", "true-positive rate at 1% false-positive rate of that attack"),
    "removed": ("dedup removed", "training rows removed by deduplication"),
    "reject_rate": ("reject rate", "fraction of drawn samples the output filter refused"),
    "train_time": ("train time", "seconds"),
}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def summarize(name: str, audit: Mapping[str, Any]) -> dict[str, Any]:
    """Return one report row (plain numbers, units in :data:`COLUMNS`) from an ``audit.json`` dict."""
    privacy = audit.get("privacy") or {}
    quality = audit.get("quality") or {}
    union = (audit.get("extraction") or {}).get("union") or {}
    best = (audit.get("mia") or {}).get("best") or {}
    data = audit.get("data") or {}
    sampling = audit.get("sampling") or {}
    run = audit.get("run") or {}
    return {
        "setting": name,
        "defense": run.get("defenses", "none"),
        "epsilon": privacy.get("epsilon"),
        "delta": privacy.get("delta"),
        "accountant": privacy.get("accountant"),
        "epsilon_holds": privacy.get("holds"),
        "privacy_known": privacy.get("known", True),
        "fid": quality.get("fid"),
        "kid": quality.get("kid_mean"),
        "kid_std": quality.get("kid_std"),
        "fid_backbone": quality.get("backbone"),
        "extracted": union.get("extracted"),
        "extracted_fraction": union.get("fraction_of_members"),
        "nn_memorized": (audit.get("memorization") or {}).get("fraction_memorized"),
        "mia": best.get("auc"),
        "tpr": best.get("tpr_at_1pct_fpr"),
        "mia_attack": best.get("attack"),
        "removed": data.get("removed_by_dedup", 0),
        "reject_rate": sampling.get("reject_rate"),
        "train_time": run.get("train_time_s"),
        "num_members": data.get("num_members"),
    }


def _cells(row: Mapping[str, Any]) -> list[str]:
    if not row.get("privacy_known", True):
        eps = "unknown"
    elif row["epsilon"] is None:
        eps = "none"
    else:
        eps = f"{row['epsilon']:.2f} ({row['delta']:.0e}, {row['accountant']})"
        if row.get("epsilon_holds") is False:
            eps += " — does NOT hold"
    fid = "—" if row["fid"] is None else f"{row['fid']:.3g} ({row['fid_backbone']})"
    kid = "—" if row["kid"] is None else f"{row['kid']:.3g} ± {row['kid_std']:.2g}"
    if row["extracted"] is None:
        extracted = "—"
    else:
        extracted = f"{row['extracted']} ({100 * (row['extracted_fraction'] or 0):.1f}%)"
    mia = "—" if row["mia"] is None else f"{row['mia']:.3f} ({row['mia_attack']})"
    train_time = "—" if row["train_time"] is None else f"{row['train_time']:.0f} s"
    return [
        row["setting"],
        row["defense"],
        eps,
        fid,
        kid,
        extracted,
        _fmt(row["nn_memorized"]),
        mia,
        _fmt(row["tpr"]),
        _fmt(row["removed"]),
        _fmt(row["reject_rate"]),
        train_time,
    ]


def markdown_table(rows: list[Mapping[str, Any]]) -> str:
    """Return the Markdown table, one row per setting."""
    header = [h for h, _ in COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def privacy_utility_figure(rows: list[Mapping[str, Any]]):
    """FID against extracted images and against the best MIA AUC, one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), layout="constrained")
    for ax, key, label in ((axes[0], "extracted", "extracted member images"), (axes[1], "mia", "best MIA AUC")):
        for r in rows:
            if r["fid"] is None or r[key] is None:
                continue
            ax.scatter(r[key], r["fid"], s=40)
            ax.annotate(r["setting"], (r[key], r["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label + " (lower = more private)")
        ax.set_ylabel(f"FID ({rows[0].get('fid_backbone') or '?'}; lower = better)")
        ax.grid(alpha=0.3)
    fig.suptitle("privacy–utility")
    return fig


def copies_figure(runs: Mapping[str, Mapping[str, Any]]):
    """Fraction of member images extracted against how many copies of them were in training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for name, audit in runs.items():
        by = audit.get("by_copies") or {}
        points = sorted((int(k), v["fraction_extracted"]) for k, v in by.items())
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("copies in the training set")
    ax.set_ylabel("fraction extracted")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("memorization vs duplication")
    return fig


def cases_figure(cases: Mapping[str, Any], max_cases: int = 12):
    """Grid of the most-extracted cases: generated sample | nearest member | distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, nearest, dist = cases["samples"][:max_cases], cases["nearest"][:max_cases], cases["distance"][:max_cases]
    n = len(samples)
    fig, axes = plt.subplots(2, max(n, 1), figsize=(1.1 * max(n, 1), 2.6), squeeze=False)
    for i in range(n):
        for row, image in ((0, samples[i]), (1, nearest[i])):
            ax = axes[row][i]
            img = image.permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1][i].set_xlabel(f"{float(dist[i]):.3f}", fontsize=8)
    axes[0][0].set_ylabel("sample", fontsize=8)
    axes[1][0].set_ylabel("nearest\nmember", fontsize=8)
    return fig


def load_cases(run_dir: Path) -> dict[str, Any] | None:
    """Read the extracted cases the audit kept on local disk (safetensors: no pickle)."""
    path = Path(run_dir) / "audit_cases.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


def write_report(
    out_dir: str | Path,
    runs: Mapping[str, Mapping[str, Any]],
    run_dirs: Mapping[str, str | Path] | None = None,
    embed_training_images: bool = True,
    title: str = "privdiff report",
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` for the audits in ``runs``.

    ``runs`` maps a setting name to its ``audit.json`` dict; ``run_dirs`` to its run directory
    (to find the extracted cases). ``embed_training_images`` puts the cases grid (which shows
    training images) into the HTML; the report says so when it does.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarize(name, audit) for name, audit in runs.items()]
    table = markdown_table(rows)
    payload = {
        "schema": REPORT_SCHEMA,
        "columns": {k: {"header": h, "unit": u} for k, (h, u) in COLUMNS.items()},
        "rows": rows,
        "runs": runs,
        "training_images_embedded": embed_training_images,
    }
    import matplotlib.pyplot as plt

    figures = {"privacy–utility": privacy_utility_figure(rows), "memorization vs copies": copies_figure(runs)}
    embedded = False
    if embed_training_images and run_dirs:
        for name, run_dir in run_dirs.items():
            cases = load_cases(Path(run_dir))
            if cases is not None and len(cases["samples"]):
                figures[f"most-extracted cases: {name}"] = cases_figure(cases)
                embedded = True
    images = {k: _png(f) for k, f in figures.items()}
    for f in figures.values():
        plt.close(f)
    payload["training_images_embedded"] = embedded
    (out / "report.json").write_text(json.dumps(payload, indent=1, default=float))
    notes = _notes(runs)
    (out / "report.md").write_text(f"# {title}\n\n{table}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    (out / "report.html").write_text(_html(title, rows, images, notes, embedded))
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}


def _notes(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    notes = [
        "Extracted: union of Carlini et al. 2023's generate-and-filter attack and the calibrated-l2 "
        "white-box check; NN-ratio: Gu et al. 2023.",
    ]
    for name, audit in runs.items():
        for key, value in (audit.get("defense_metrics") or {}).items():
            if key.endswith("/guarantee"):
                notes.append(f"{name}: the output filter gives {value}.")
            if key.endswith("/duplicates_note"):
                notes.append(f"{name}: {value}")
        for g in (audit.get("privacy") or {}).get("guarantees", []):
            spent = (
                f"{name}: {g['defense']} spent ε={_fmt(g['epsilon'], 4)} at δ={_fmt(g['delta'])} ({g['accountant']} accountant"
                + (f", {g['steps']} steps)" if g.get("steps") is not None else ")")
            )
            if g.get("budget") is not None:
                spent += f" of a budget of ε={_fmt(g['budget'])}" + (" — OVER BUDGET" if g["epsilon"] > g["budget"] else "")
            if not g.get("holds", True):
                spent += " — this guarantee does NOT hold"
            caveats = "; ".join(g.get("caveats", []))
            notes.append(spent + f"; privacy unit: {g['privacy_unit']}" + (f"; {caveats}." if caveats else "."))
        if (audit.get("privacy") or {}).get("known") is False:
            notes.append(f"{name}: audited without its training record (defenses.json): its defenses and ε are unknown.")
    return notes


def _html(title: str, rows: list[Mapping[str, Any]], images: Mapping[str, str], notes: list[str], embedded: bool) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in COLUMNS.values())
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows)
    figs = "".join(
        f"<figure><img alt='{html.escape(k)}' src='data:image/png;base64,{v}'/><figcaption>{html.escape(k)}</figcaption></figure>"
        for k, v in images.items()
    )
    warning = (
        "<p class='warn'>This report embeds images of training data (extracted cases). Keep it as private as the data.</p>"
        if embedded
        else "<p>No image of training data is embedded in this report.</p>"
    )
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f4f4f4}}
td:first-child,td:nth-child(2){{text-align:left}}figure{{display:inline-block;margin:1em}}.warn{{color:#a00}}</style>
</head><body><h1>{html.escape(title)}</h1>{warning}
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<ul>{note_html}</ul>{figs}</body></html>
"""
