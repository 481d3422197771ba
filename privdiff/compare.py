"""``privdiff compare``: train and audit several defense settings on the same data, split and audit, one report.

Each setting runs ``privdiff fit`` in its own process (a crash stays in its run; two 1-thread
processes also beat one 2-thread process on CPU), ``parallel`` at a time (a thread pool waits on them). A setting whose ``audit.json`` exists is reused
when the command is repeated; one with a checkpoint but no audit resumes from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


@dataclass
class Setting:
    """One row of a comparison.

    Args:
        configs: config files stacked after the shared ones (e.g. ``configs/defense/dp_sgd.yaml``).
        args: command-line overrides for ``privdiff fit`` (e.g. ``["--trainer.max_steps", "500"]``).
        audit_of: audit the model trained by that other setting instead of training again; only the
            generation-side defenses of ``configs`` then apply (e.g. an output filter).
    """

    configs: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    audit_of: str | None = None


def _threads(parallel: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, parallel))


def _fit_command(shared: Sequence[str], shared_args: Sequence[str], setting: Setting, run_dir: Path, group: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "privdiff", "fit"]
    for c in [*shared, *setting.configs]:
        cmd += ["-c", c]
    cmd += ["--run_dir", str(run_dir), *shared_args, *setting.args]
    if group:
        cmd += ["--logging.wandb_group", group]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        cmd += ["--ckpt_path", "last"]
    return cmd


def _generation_defenses(config_files: Sequence[str]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for path in config_files:
        data = yaml.safe_load(Path(path).read_text()) or {}
        section = data.get("data") or {}
        entries += (section.get("defenses") or []) + (section.get("defenses+") or [])
    return entries


def _audit_command(setting: Setting, source_dir: Path, run_dir: Path) -> list[str]:
    """``privdiff audit`` of another setting's model, with the very audit settings that run used.

    They come from the source run's resolved ``config.yaml`` (shared config files and ``args``
    applied), so this row is audited exactly like its neighbours; only the generation-side defenses
    of this setting's own config files are added.
    """
    resolved = yaml.safe_load((source_dir / "config.yaml").read_text()) or {}
    run_dir.mkdir(parents=True, exist_ok=True)
    audit_file = run_dir / "audit_settings.yaml"
    audit_file.write_text(yaml.safe_dump({"audit": resolved.get("audit")}))
    cmd = [sys.executable, "-m", "privdiff", "audit", "--run", str(source_dir), "--out", str(run_dir), "-c", str(audit_file)]
    defenses = _generation_defenses(setting.configs)
    if defenses:
        cmd += ["--defenses", json.dumps(defenses)]
    return cmd


def check_settings(settings: dict[str, Setting]) -> None:
    """Raise ``ValueError`` naming the setting when the grid cannot run: none at all, or an ``audit_of`` that names no
    setting, names one that itself audits, or comes with args of its own (which would not apply)."""
    if not settings:
        raise ValueError("a comparison needs at least one entry under `settings:`")
    for name, s in settings.items():
        if s.audit_of is not None and s.audit_of not in settings:
            raise ValueError(f"setting {name!r}: audit_of={s.audit_of!r} is not one of {sorted(settings)}")
        if s.audit_of is not None and settings[s.audit_of].audit_of is not None:
            raise ValueError(f"setting {name!r}: audit_of must name a setting that trains ({s.audit_of!r} does not)")
        if s.audit_of is not None and s.args:
            raise ValueError(
                f"setting {name!r}: audit_of settings are audited with the settings of the run they audit ({s.audit_of!r}); "
                f"its args {s.args} would not apply. Put them in the shared args or in {s.audit_of!r}'s"
            )


def report_title(title: str, args: list[str]) -> str:
    """``title``, with the data overrides among ``args`` appended: a comparison's YAML title describes the
    data of its configs, which ``--args "[--data.source=faces, ...]"`` replace."""
    overrides, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--data.") and "=" in arg:
            overrides.append(arg[2:])
        elif arg.startswith("--data.") and i + 1 < len(args):
            overrides.append(f"{arg[2:]}={args[i + 1]}")
            i += 1
        i += 1
    return f"{title} (data overridden: {', '.join(overrides)})" if overrides else title


def compare(
    settings: dict[str, Setting],
    configs: list[str],
    args: list[str] | None = None,
    out_dir: str = "runs/compare",
    parallel: int = 1,
    wandb: bool = False,
    title: str = "privdiff comparison",
) -> dict[str, Any]:
    """Train and audit every setting, then write ``report.{json,md,html}`` into ``out_dir``.

    Args:
        settings: name -> :class:`Setting`; all share ``configs`` (data, model, audit) and ``args``.
        configs: config files every setting stacks first (the same data, split and audit for all).
        args: overrides every setting gets (e.g. a shorter ``--trainer.max_steps``).
        out_dir: the comparison's directory; setting ``name`` runs in ``out_dir/name``.
        parallel: settings run side by side (each with cores/parallel threads).
        wandb: log every run to wandb (offline unless ``WANDB_MODE=online``) in one group, and the table.
        title: the report's title.

    Returns the audits by setting name. Raises ``RuntimeError`` naming the settings that failed
    (after writing the report of those that finished).
    """
    check_settings(settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    group = out.name if wandb else None
    shared_args = list(args or [])
    if wandb:
        shared_args += ["--logging.wandb", "true"]
    env = dict(os.environ, OMP_NUM_THREADS=str(_threads(parallel)), MKL_NUM_THREADS=str(_threads(parallel)))
    env.setdefault("WANDB_MODE", "offline")

    done = {n for n in settings if (out / n / "audit.json").is_file()}
    for n in sorted(done):
        print(f"privdiff compare: reusing finished run {out / n}")
    failed: dict[str, str] = {}
    started = time.perf_counter()

    def run(name: str) -> tuple[str, int, float]:
        s, run_dir = settings[name], out / name
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = _fit_command(configs, shared_args, s, run_dir, group) if s.audit_of is None else _audit_command(s, out / s.audit_of, run_dir)
        print(f"privdiff compare: starting {name} (log: {run_dir / 'compare.log'})")
        t0 = time.perf_counter()
        with open(run_dir / "compare.log", "a") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        return name, code, time.perf_counter() - t0

    # Settings that train start first; one that audits another's model starts when that one is done.
    waiting = {n: settings[n].audit_of for n in settings if n not in done}
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {pool.submit(run, n) for n, src in list(waiting.items()) if src is None or src in done}
        waiting = {n: src for n, src in waiting.items() if not (src is None or src in done)}
        while futures:
            finished, futures = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                name, code, seconds = future.result()
                if code == 0 and (out / name / "audit.json").is_file():
                    done.add(name)
                    print(f"privdiff compare: {name} finished in {seconds:.0f} s")
                else:
                    failed[name] = f"exit code {code}: {_last_error(out / name / 'compare.log')} (log: {out / name / 'compare.log'})"
                    print(f"privdiff compare: {name} FAILED ({failed[name]})")
                for dependent in [n for n, src in waiting.items() if src == name]:
                    del waiting[dependent]
                    if name in done:
                        futures.add(pool.submit(run, dependent))
                    else:
                        failed[dependent] = f"its model ({name}) failed"
    audits = {n: json.loads((out / n / "audit.json").read_text()) for n in settings if n in done}
    for name in audits:
        src = settings[name].audit_of
        if src is not None and src in audits:
            audits[name]["run"]["train_time_s"] = audits[src]["run"].get("train_time_s")
    if audits:
        from privdiff.eval.report import markdown_table, summarize, write_report

        report_start = time.perf_counter()
        paths = write_report(out, audits, {n: out / n for n in audits}, title=report_title(title, shared_args), failed=failed)
        table = markdown_table([summarize(n, a) for n, a in audits.items()])
        report_time = time.perf_counter() - report_start
        print(f"\n{table}\n")
        print(f"privdiff compare: {len(audits)} setting(s) in {time.perf_counter() - started:.0f} s; report: {paths['html']}")
        print(_breakdown(audits, report_time))
        if wandb:
            _log_wandb_table(out, group, audits)
    if failed:
        raise RuntimeError(f"settings failed: {failed}. Rerun the same command to retry them; finished runs are reused")
    return audits


def _last_error(log: Path) -> str:
    """The last line of a failed run's log that names an error (the exception), or its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors or lines or ["no output"])[-1][:500]


def _breakdown(audits: dict[str, Any], report_time: float) -> str:
    """Seconds per stage and setting (training, sampling, each attack or metric), so that the slowest shows."""
    stages: list[str] = []
    for a in audits.values():
        stages += [k for k in a.get("timings_s", {}) if k not in stages]
    lines = ["time per stage (s): setting | train | " + " | ".join(stages)]
    for name, a in audits.items():
        t, train = a.get("timings_s", {}), a["run"].get("train_time_s")
        cells = ["-" if train is None else f"{train:.0f}", *(f"{t[k]:.0f}" if k in t else "-" for k in stages)]
        lines.append(f"  {name} | " + " | ".join(cells))
    lines.append(f"  report (all settings): {report_time:.1f}")
    return "\n".join(lines)


def _log_wandb_table(out: Path, group: str | None, audits: dict[str, Any]) -> None:
    import wandb as wb

    from privdiff.eval.report import summarize, table_cells, table_columns

    rows = [summarize(n, a) for n, a in audits.items()]
    columns = table_columns(rows)
    run = wb.init(project="privdiff", group=group, name=f"{group}-table", dir=str(out), job_type="compare")
    run.log({"comparison": wb.Table(columns=[c["header"] for c in columns], data=[table_cells(r, columns) for r in rows])})
    run.finish()
