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

REPORT_SCHEMA = "privdiff.report/2"

# The columns every run has, around the ones its attacks and metrics report (audit.json "plugins").
FIXED_BEFORE: list[tuple[str, str, str]] = [
    ("setting", "setting", ""),
    ("defense", "defense", ""),
    ("epsilon", "ε (δ, accountant)", "epsilon spent, of (epsilon, delta)-DP, by the named accountant; 'none' without a DP defense"),
]
FIXED_AFTER: list[tuple[str, str, str]] = [
    ("removed", "rows removed", "training rows a data defense removed (deduplication)"),
    ("reject_rate", "reject rate", "fraction of drawn samples a generation-side defense refused"),
    ("train_time", "train time", "seconds"),
]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _epsilon_text(privacy: Mapping[str, Any]) -> str:
    if privacy.get("known") is False:
        return "unknown"
    if privacy.get("epsilon") is None:
        return "none"
    text = f"{privacy['epsilon']:.2f} ({privacy['delta']:.0e}, {privacy['accountant']})"
    return text + (" — does NOT hold" if privacy.get("holds") is False else "")


def summarize(name: str, audit: Mapping[str, Any]) -> dict[str, Any]:
    """One report row from an ``audit.json`` dict: each column's value by key, ``text`` as shown, ``columns`` in order.

    The columns are the fixed ones (setting, defense, ε; rows removed, reject rate, train time) around
    those the run's attacks and metrics reported (``audit["plugins"][name]["columns"]``).
    """
    privacy = audit.get("privacy") or {}
    run, data, sampling = audit.get("run") or {}, audit.get("data") or {}, audit.get("sampling") or {}
    train_time = run.get("train_time_s")
    before = {
        "setting": (name, name),
        "defense": (run.get("defenses", "none"), run.get("defenses", "none")),
        "epsilon": (privacy.get("epsilon"), _epsilon_text(privacy)),
    }
    after = {
        "removed": (data.get("removed_by_defenses", 0), _fmt(data.get("removed_by_defenses", 0))),
        "reject_rate": (sampling.get("reject_rate"), _fmt(sampling.get("reject_rate"))),
        "train_time": (train_time, "—" if train_time is None else f"{train_time:.0f} s"),
    }
    columns = [{"key": k, "header": h, "unit": u, "role": ""} for k, h, u in FIXED_BEFORE]
    values = {k: v for k, (v, _) in before.items()}
    text = {k: t for k, (_, t) in before.items()}
    for plugin in (audit.get("plugins") or {}).values():
        for c in plugin.get("columns", []):
            columns.append({k: c[k] for k in ("key", "header", "unit", "role")})
            values[c["key"]], text[c["key"]] = c["value"], c["text"]
    columns += [{"key": k, "header": h, "unit": u, "role": ""} for k, h, u in FIXED_AFTER]
    values.update({k: v for k, (v, _) in after.items()})
    text.update({k: t for k, (_, t) in after.items()})
    return {
        **values,
        "delta": privacy.get("delta"), "accountant": privacy.get("accountant"), "epsilon_holds": privacy.get("holds"),
        "num_members": data.get("num_members"), "text": text, "columns": columns,
    }


def table_columns(rows: list[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Every column of the rows, in order of first appearance (settings may run different attacks)."""
    seen: dict[str, dict[str, str]] = {}
    for row in rows:
        for c in row["columns"]:
            seen.setdefault(c["key"], c)
    fixed_after = [k for k, _, _ in FIXED_AFTER]
    ordered = [c for k, c in seen.items() if k not in fixed_after] + [seen[k] for k in fixed_after if k in seen]
    return ordered


def table_cells(row: Mapping[str, Any], columns: list[dict[str, str]]) -> list[str]:
    """A row's cells for ``columns`` ("—" where the row has no such column)."""
    return [row["text"].get(c["key"], "—") for c in columns]


def markdown_table(rows: list[Mapping[str, Any]]) -> str:
    """Return the Markdown table, one row per setting."""
    columns = table_columns(rows)
    lines = ["| " + " | ".join(c["header"] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(table_cells(r, columns)) + " |" for r in rows]
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def privacy_utility_figure(rows: list[Mapping[str, Any]]):
    """The utility column (e.g. FID) against each privacy column (extracted, memorized, MIA AUC), one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = table_columns(rows)
    utility = next((c for c in columns if c["role"] == "utility"), None)
    privacy = [c for c in columns if c["role"] == "privacy"]
    if utility is None or not privacy:
        return None
    fig, axes = plt.subplots(1, len(privacy), figsize=(4.2 * len(privacy), 3.8), layout="constrained", squeeze=False)
    for ax, column in zip(axes[0], privacy):
        for r in rows:
            x, y = r.get(column["key"]), r.get(utility["key"])
            if not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
                continue
            ax.scatter(x, y, s=40)
            ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(column["header"] + " (lower = more private)")
        ax.set_ylabel(f"{utility['header']} ({rows[0]['text'].get(utility['key'], '').rpartition('(')[2].rstrip(')') or '?'}; lower = better)")
        ax.grid(alpha=0.3)
    fig.suptitle("privacy–utility")
    return fig


def plugin_figures(runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Any]]:
    """The figures each attack or metric draws from the runs' audits (its class's ``figures``)."""
    import importlib

    classes: dict[str, type] = {}
    for audit in runs.values():
        for plugin in (audit.get("plugins") or {}).values():
            path = plugin.get("class_path")
            if path and path not in classes:
                module, _, name = path.rpartition(".")
                try:
                    classes[path] = getattr(importlib.import_module(module), name)
                except (ImportError, AttributeError):
                    continue  # a plugin of another installation: its columns are shown, its figures are not
    return [fig for cls in classes.values() for fig in cls.figures(runs)]


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
        "columns": {c["key"]: {"header": c["header"], "unit": c["unit"], "role": c["role"]} for c in table_columns(rows)},
        "rows": rows,
        "runs": runs,
        "training_images_embedded": embed_training_images,
    }
    import matplotlib.pyplot as plt

    figures = {"privacy–utility": privacy_utility_figure(rows), **dict(plugin_figures(runs))}
    figures = {k: f for k, f in figures.items() if f is not None}
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
    notes: list[str] = []
    for audit in runs.values():
        for plugin in (audit.get("plugins") or {}).values():
            notes += [n for n in plugin.get("notes", []) if n not in notes]
    for name, audit in runs.items():
        for key, value in (audit.get("defense_metrics") or {}).items():
            # A defense without a formal guarantee says what it does give in its "guarantee" metric.
            if key.endswith("/guarantee"):
                notes.append(f"{name}: {key.split('/')[1]} gives {value}.")
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
    columns = table_columns(rows)
    head = "".join(f"<th title='{html.escape(c['unit'])}'>{html.escape(c['header'])}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in table_cells(r, columns)) + "</tr>" for r in rows)
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
td:first-child,td:nth-child(2){{text-align:left}}figure{{display:inline-block;margin:1em;max-width:100%}}
figure img{{max-width:100%}}.warn{{color:#a00}}</style>
</head><body><h1>{html.escape(title)}</h1>{warning}
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<ul>{note_html}</ul>{figs}</body></html>
"""
