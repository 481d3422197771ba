"""Reports of one run or a comparison: ``report.json`` (versioned, with units), ``report.md`` and a
self-contained ``report.html`` with the privacy-utility figures and the most-extracted cases."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any, Mapping

from .trajectory import tradeoff_figure, trajectory_figure, trajectory_notes

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
    columns = [{"key": k, "header": h, "unit": u, "role": "", "plugin": ""} for k, h, u in FIXED_BEFORE]
    values = {k: v for k, (v, _) in before.items()}
    text = {k: t for k, (_, t) in before.items()}
    for plugin_name, plugin in (audit.get("plugins") or {}).items():
        for c in plugin.get("columns", []):
            columns.append({**{k: c[k] for k in ("key", "header", "unit", "role")}, "plugin": plugin_name})
            values[c["key"]], text[c["key"]] = c["value"], c["text"]
    columns += [{"key": k, "header": h, "unit": u, "role": "", "plugin": ""} for k, h, u in FIXED_AFTER]
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


def split_tables(rows: list[Mapping[str, Any]]) -> list[tuple[str, list[dict[str, str]]]]:
    """The table cut in two that fit a laptop screen: privacy (ε, the attacks, the checks of ε) and utility and cost
    (every column of a plugin that reports a utility figure, the rows a defense removed, the samples it refused, the
    training time). The setting's name heads both."""
    columns = table_columns(rows)
    utility_plugins = {c.get("plugin") for c in columns if c["role"] == "utility" and c.get("plugin")}
    is_utility = [c.get("plugin") in utility_plugins or c["key"] in [k for k, _, _ in FIXED_AFTER] for c in columns]
    setting = [c for c in columns if c["key"] == "setting"]
    privacy = [c for c, u in zip(columns, is_utility) if not u]
    utility = setting + [c for c, u in zip(columns, is_utility) if u]
    return [("Privacy", privacy), ("Utility and cost", utility)]


def setting_verdict(name: str, audit: Mapping[str, Any]) -> dict[str, Any]:
    """One setting's verdict: its defenses, its ε (or none), and each plugin's clause (``AuditResult.verdict``; for a
    plugin that gives none, its privacy and utility columns), privacy first, utility last."""
    privacy = audit.get("privacy") or {}
    claim = "ε unknown (no training record)" if privacy.get("known") is False else (
        "no DP guarantee" if privacy.get("epsilon") is None else f"ε {_epsilon_text(privacy)}")
    clauses, utility = [], []
    for plugin in (audit.get("plugins") or {}).values():
        said = [plugin["verdict"]] if plugin.get("verdict") else [
            f"{c['header']} {c['text']}" for c in plugin.get("columns", []) if c.get("role")]
        # privacy first (what was extracted, membership, the checks of epsilon), utility last
        (utility if any(c.get("role") == "utility" for c in plugin.get("columns", [])) else clauses).extend(said)
    return {"setting": name, "defense": (audit.get("run") or {}).get("defenses", "none"), "privacy": claim,
            "clauses": clauses + utility}


def note_groups(runs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The notes grouped by attack (a plugin's notes that every setting gives said once, the others named by the
    settings that gave them), then the training's: the audit through training and what each defense spent or gives."""
    groups: dict[str, dict[str, list[str]]] = {}
    for name, audit in runs.items():
        for plugin_name, plugin in (audit.get("plugins") or {}).items():
            said = groups.setdefault(plugin_name, {})
            for n in plugin.get("notes", []):
                names = said.setdefault(n, [])
                if name not in names:
                    names.append(name)
    out = [{"name": plugin_name, "common": [n for n, names in said.items() if len(names) == len(runs)],
            "by_setting": [(", ".join(names), n) for n, names in said.items() if len(names) < len(runs)]}
           for plugin_name, said in groups.items()]
    training = _training_notes(runs)
    if training:
        out.append({"name": "training and defenses", "common": [n for setting, n in training if not setting],
                    "by_setting": [(setting, n) for setting, n in training if setting]})
    return out


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
    """The utility column (e.g. FID) against each privacy column (extracted, memorized, MIA AUC), one point per setting.

    None with fewer than two settings (one point on axes of its own scale says nothing). Settings
    are told apart by marker and colour in one legend, so labels never overlap.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = table_columns(rows)
    utility = next((c for c in columns if c["role"] == "utility"), None)
    privacy = [c for c in columns if c["role"] == "privacy"]
    if utility is None or not privacy or len(rows) < 2:
        return None
    markers = "osD^vP*X"
    fig, axes = plt.subplots(1, len(privacy), figsize=(3.6 * len(privacy) + 1.6, 3.4), layout="constrained", squeeze=False)
    for ax, column in zip(axes[0], privacy):
        for i, r in enumerate(rows):
            x, y = r.get(column["key"]), r.get(utility["key"])
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                ax.scatter(x, y, s=55, marker=markers[i % len(markers)], color=f"C{i}", alpha=0.85, label=r["setting"])
        ax.set_xlabel(column["header"] + "\n(lower = more private)", fontsize=8)
        ax.set_ylabel(f"{utility['header']} (lower = better)", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    backbone = rows[0]["text"].get(utility["key"], "").rpartition("(")[2].rstrip(")")
    fig.suptitle(f"privacy–utility ({utility['header']} in {backbone or '?'} features)", fontsize=10)
    return fig


def plugin_figures(runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Any]]:
    """The figures each attack or metric draws from the runs' audits (its class's ``figures``)."""
    from privdiff.classpath import class_from_path

    classes: dict[str, type] = {}
    for audit in runs.values():
        for plugin in (audit.get("plugins") or {}).values():
            path = plugin.get("class_path")
            if path and path not in classes:
                try:
                    classes[path] = class_from_path(path)
                except ValueError:
                    continue  # a plugin of another installation: its columns are shown, its figures are not
    return [fig for cls in classes.values() for fig in cls.figures(runs)]


def cases_figure(cases: Mapping[str, Any], max_cases: int = 12):
    """Grid of the most-extracted cases: generated sample | nearest member, with distance, member id,
    the group's training rows, the attack that flagged it and (text-to-image) the member's caption under each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, nearest, dist = cases["samples"][:max_cases], cases["nearest"][:max_cases], cases["distance"][:max_cases]
    ids, flagged, copies, captions = (list(cases.get(k, []))[:max_cases] for k in ("member_ids", "flagged_by", "copies", "captions"))
    n = len(samples)
    wrapped = [textwrap.wrap(str(c), 20)[:6] for c in captions]
    extra = 0.12 * max((len(w) for w in wrapped), default=0)
    fig, axes = plt.subplots(2, max(n, 1), figsize=(1.45 * max(n, 1), 3.3 + extra), squeeze=False)
    for i in range(n):
        for row, image in ((0, samples[i]), (1, nearest[i])):
            ax = axes[row][i]
            img = image.permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        label = [f"l2 {float(dist[i]):.3f}"]
        if i < len(ids):
            label.append(str(ids[i]).rsplit("/", 1)[-1][:14])
        if i < len(copies):
            label.append(f"{copies[i]} row(s)")
        if i < len(flagged):
            label.append({"generate_and_filter": "clique", "calibrated_l2": "cal. l2", "prompt": "prompted"}.get(flagged[i], flagged[i]))
        if i < len(wrapped) and wrapped[i]:
            label.append("\u201c" + "\n".join(wrapped[i]) + "\u201d")
        axes[1][i].set_xlabel("\n".join(label), fontsize=6.5)
    axes[0][0].set_ylabel("sample", fontsize=8)
    axes[1][0].set_ylabel("nearest\nmember", fontsize=8)
    return fig


def load_cases(run_dir: Path) -> dict[str, Any] | None:
    """Read the extracted cases the audit kept on local disk (safetensors: no pickle), with their labels."""
    path = Path(run_dir) / "audit_cases.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    cases: dict[str, Any] = dict(load_file(str(path)))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    for key in ("member_ids", "flagged_by", "copies", "captions"):
        if key in meta:
            cases[key] = json.loads(meta[key])
    return cases


def write_report(
    out_dir: str | Path,
    runs: Mapping[str, Mapping[str, Any]],
    run_dirs: Mapping[str, str | Path] | None = None,
    embed_training_images: bool = True,
    title: str = "privdiff report",
    failed: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` for the audits in ``runs``.

    ``runs`` maps a setting name to its ``audit.json`` dict; ``run_dirs`` to its run directory
    (to find the extracted cases and link each setting's own report). ``embed_training_images``
    puts the cases grid (which shows training images) into the HTML; the report says so when it
    does. ``failed`` maps settings that did not finish to their error, reported too.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarize(name, audit) for name, audit in runs.items()]
    table = markdown_table(rows)
    failed = dict(failed or {})
    payload = {
        "schema": REPORT_SCHEMA,
        "columns": {c["key"]: {"header": c["header"], "unit": c["unit"], "role": c["role"]} for c in table_columns(rows)},
        "rows": rows,
        "runs": runs,
        "failed": failed,
        "training_images_embedded": embed_training_images,
    }
    import matplotlib.pyplot as plt

    figures = {"privacy–utility": privacy_utility_figure(rows), "memorization through training": trajectory_figure(runs),
               "utility and memorization through training": tradeoff_figure(runs),
               **dict(plugin_figures(runs))}
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
    links = {}
    for name, run_dir in (run_dirs or {}).items():
        target = Path(run_dir) / "report.html"
        if Path(run_dir).resolve() != out.resolve() and (target.is_file() or len(runs) > 1):
            links[name] = os.path.relpath(target, out)
    (out / "report.json").write_text(json.dumps(payload, indent=1, default=float))
    notes = _notes(runs)
    details = {name: details_of(audit) for name, audit in runs.items()}
    verdict_lines = [setting_verdict(name, audit) for name, audit in runs.items()]
    (out / "report.md").write_text(_markdown(title, table, notes, details, failed, links, verdict_lines))
    (out / "report.html").write_text(_html(title, rows, images, runs, embedded, details, failed, links))
    return {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}


def _model_text(model: Mapping[str, Any]) -> str:
    """The model's kind, adapters and autoencoder (a latent model's reconstruction error, and what it learned from)."""
    if not model:
        return "—"
    parts = [str(model.get("kind", "—"))]
    if model.get("lora_rank"):
        parts.append(f"LoRA rank {model['lora_rank']}")
    if model.get("guidance_scale") not in (None, 1.0):
        parts.append(f"guidance {model['guidance_scale']:g}")
    vae = model.get("vae") or {}
    if vae:
        parts.append(f"VAE reconstruction l2 {vae['reconstruction_l2']:.4f} on {vae['num_checked']} unseen images "
                     f"(trained {vae['steps']} steps on {vae['num_images']} {vae['trained_on']})")
    return "; ".join(parts)


def _saturation_text(sampling: Mapping[str, Any]) -> str:
    check = sampling.get("solver_check") or {}
    if check.get("not_applicable"):
        return " — SATURATED: the model's samples (it has no solver to change)"
    if check.get("model_saturated"):
        return " — SATURATED with every solver (" + ", ".join(check["solvers"]) + "): the model's samples, not the solver's"
    if check.get("sane"):
        return f" — SATURATED with this solver, not with {', '.join(check['sane'])} on the same weights: change audit.solver"
    return " — SATURATED: the solver may not fit the model"


def details_of(audit: Mapping[str, Any]) -> dict[str, Any]:
    """What the report shows of one run beyond its table row: thresholds, MIA per attack, sampling, data, provenance."""
    thresholds = []
    found = [(name, (audit.get(name) or {}).get("thresholds") or {}) for name in (audit.get("plugins") or {})]
    found += [(f"{name} (decoded)", ((audit.get(name) or {}).get("decoded") or {}).get("thresholds") or {}) for name in (audit.get("plugins") or {})]
    for name, criteria in found:
        for key, t in criteria.items():
            lo_hi = t.get("heldout_interval") or [None, None]
            thresholds.append({
                "attack": name, "criterion": t["criterion"], "value": t["value"], "how": t.get("how", t["description"]),
                "heldout": "—" if t.get("heldout_rate") is None else f"{t['heldout_rate']:.1%} [{lo_hi[0]:.1%}, {lo_hi[1]:.1%}] of {t['num_heldout']}",
                "published": "—" if t.get("published") is None else f"{t['published']:.4g}",
                "published_rate": "—" if t.get("published_rate") is None else f"{t['published_rate']:.1%}",
                "status": t.get("status_text") or "—",
            })
    mia = []
    for attack, r in (audit.get("mia") or {}).items():
        if isinstance(r, dict) and "auc_interval" in r:
            mia.append({
                "attack": attack if attack != "best" else f"best ({r.get('attack')})",
                "auc": f"{r['auc']:.3f} [{r['auc_interval'][0]:.3f}, {r['auc_interval'][1]:.3f}]",
                "tpr": f"{r['tpr']:.3g} [{r['tpr_interval'][0]:.2f}, {r['tpr_interval'][1]:.2f}] at FPR {r['fpr']:.1%}",
                "verdict": r.get("verdict", ""),
                "chosen": ", ".join(r.get("chosen", [])) or str(r.get("t", r.get("t_sec", ""))),
            })
    sampling, data, run, env = audit.get("sampling") or {}, audit.get("data") or {}, audit.get("run") or {}, audit.get("environment") or {}
    sanity = sampling.get("sanity") or {}
    facts = {
        "training steps": "—" if run.get("steps") is None else run["steps"],  # — : an audit of a saved model
        "samples / solver": f"{sampling.get('num_samples')} ({sampling.get('num_drawn')} drawn) / {sampling.get('solver')} {sampling.get('steps')} steps",
        "sample sanity": "—" if not sanity else (
            f"{sanity['saturated_low']:.1%} of pixels at 0, {sanity['saturated_high']:.1%} at 1 (members: "
            f"{sanity['real_saturated_low']:.1%}, {sanity['real_saturated_high']:.1%})" + ("" if sanity["ok"] else _saturation_text(sampling))
        ),
        "model": _model_text(audit.get("model") or {}),
        "members (groups of near-copies) / training rows": f"{data.get('num_members')} ({data.get('num_member_groups', data.get('num_members'))}) / {data.get('num_train_rows')}",
        "held-out: calibration / evaluation": f"{data.get('num_heldout')}: {data.get('num_calibration', '—')} / {data.get('num_evaluation', '—')}",
        "planted duplicates / rows removed by defenses": f"{data.get('planted_duplicates')} / {data.get('removed_by_defenses', 0)}",
        "seed": env.get("seed"),
        "privdiff commit": (env.get("git_commit") or "—") + (" (uncommitted changes)" if env.get("git_dirty") else ""),
        "versions": ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v),
    }
    return {"thresholds": thresholds, "mia": mia, "facts": facts}


def _markdown(title: str, table: str, notes: list[str], details: Mapping[str, Any], failed: Mapping[str, str],
              links: Mapping[str, str], verdicts: list[Mapping[str, Any]] = ()) -> str:
    lines = [f"# {title}", "", table, ""]
    lines += [f"- **{v['setting']}** ({v['defense']}): " + "; ".join([v["privacy"], *v["clauses"]]) + "." for v in verdicts]
    lines += [""] if verdicts else []
    lines += [f"- {n}" for n in notes]
    if failed:
        lines += ["", "## Settings that failed", ""] + [f"- **{name}**: {error}" for name, error in failed.items()]
    for name, d in details.items():
        lines += ["", f"## {name}" + (f" ([report]({links[name]}))" if name in links else ""), ""]
        lines += [f"- {k}: {v}" for k, v in d["facts"].items()]
        if d["thresholds"]:
            lines += ["", "| attack | criterion | threshold | how | held-out flagged [95%] | the asked rate | published | its rate |", "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {t['attack']} | {t['criterion']} | {t['value']:.4g} | {t['how']} | {t['heldout']} | {t['status']} | {t['published']} | {t['published_rate']} |"
                      for t in d["thresholds"]]
        if d["mia"]:
            lines += ["", "| MIA attack | AUC [95%] | TPR [95%] | verdict | chosen on the other half |", "|---|---|---|---|---|"]
            lines += [f"| {m['attack']} | {m['auc']} | {m['tpr']} | {m['verdict']} | {m['chosen']} |" for m in d["mia"]]
    return "\n".join(lines) + "\n"


def _notes(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """:func:`note_groups` as one list for report.md: a note some settings gave is prefixed with their names."""
    return [n for group in note_groups(runs)
            for n in [*group["common"], *(f"{setting}: {text}" for setting, text in group["by_setting"])]]


def _training_notes(runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(setting, note): the audit through training's notes and what each defense spent or gives ("" for all settings)."""
    notes = []
    for note in trajectory_notes(runs):  # each written "<setting>: ..."
        setting = next((name for name in runs if note.startswith(f"{name}: ")), "")
        notes.append((setting, note[len(setting) + 2:] if setting else note))
    for name, audit in runs.items():
        for key, value in (audit.get("defense_metrics") or {}).items():
            # A defense without a formal guarantee says what it does give in its "guarantee" metric.
            if key.endswith("/guarantee"):
                notes.append((name, f"{key.split('/')[1]} gives {value}."))
        for g in (audit.get("privacy") or {}).get("guarantees", []):
            spent = (
                f"{g['defense']} spent ε={_fmt(g['epsilon'], 4)} at δ={_fmt(g['delta'])} ({g['accountant']} accountant"
                + (f", {g['steps']} steps)" if g.get("steps") is not None else ")")
            )
            if g.get("budget") is not None:
                spent += f" of a budget of ε={_fmt(g['budget'])}" + (" — OVER BUDGET" if g["epsilon"] > g["budget"] else "")
            if not g.get("holds", True):
                spent += " — this guarantee does NOT hold"
            caveats = "; ".join(g.get("caveats", []))
            notes.append((name, spent + f"; privacy unit: {g['privacy_unit']}" + (f"; {caveats}." if caveats else ".")))
        if (audit.get("privacy") or {}).get("known") is False:
            notes.append((name, "audited without its training record (defenses.json): its defenses and ε are unknown."))
    return notes


def _html(
    title: str, rows: list[Mapping[str, Any]], images: Mapping[str, str], runs: Mapping[str, Mapping[str, Any]], embedded: bool,
    details: Mapping[str, Any], failed: Mapping[str, str], links: Mapping[str, str],
) -> str:
    """The HTML report through ``templates/report.html.j2`` (autoescaped): verdicts, the privacy and utility tables,
    figures, notes by attack, and each setting's details."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    tables = [{"name": name, "columns": columns,
               "rows": [{"cells": table_cells(r, columns), "link": links.get(r["setting"])} for r in rows]}
              for name, columns in split_tables(rows)]
    verdicts = [{**setting_verdict(name, audit), "link": links.get(name)} for name, audit in runs.items()]
    sections = [{"name": name, "link": links.get(name), **d} for name, d in details.items()]
    return env.get_template("report.html.j2").render(
        title=title, embedded=embedded, verdicts=verdicts, tables=tables, failed=failed, images=images,
        note_groups=note_groups(runs), sections=sections,
    )
