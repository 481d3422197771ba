"""The audit through training: curves in every logger, a resume that keeps them, the checkpoint chosen, a budget."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from privdiff.cli import run_fit_cli
from privdiff.eval.periodic import SelectionRule, trajectory_point

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = ["--model.diffusion.block_out_channels", "[8, 16]", "--model.diffusion.attention_levels", "[1]",
        "--data.num_members", "24", "--data.num_heldout", "40", "--data.batch_size", "8",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]
PERIODIC = """
periodic_audit:
  every_n_steps: {every}
  stop_after: {stop_after}
  profile:
    num_samples: 16
    steps: 2
    batch_size: 16
    progress: false
    attacks:
      extraction: {{class_path: privdiff.eval.extraction.ExtractionAttack, init_args: {{min_clique: 3}}}}
      mia: {{class_path: privdiff.eval.mia.MembershipInference, init_args: {{attacks: [loss], examples: 8, loss_timesteps: [50]}}}}
"""


def args(tmp_path: Path, every: int = 2, stop_after: str = "null", *extra: str) -> list[str]:
    config = tmp_path / "periodic.yaml"
    config.write_text(PERIODIC.format(every=every, stop_after=stop_after))
    return ["fit", "-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", "configs/model/small.yaml",
            "-c", str(config), *TINY, *extra]


# -- the rule, on points -------------------------------------------------------------------------
def point(step: int, fid: float, extracted: int, above: bool, auc=(0.5, [0.4, 0.6])) -> dict:
    return {"step": step, "fid": fid, "extracted": extracted, "chance": 0.2, "p_value": 0.001 if above else 0.5,
            "above_chance": above, "mia_auc": auc[0], "mia_auc_interval": auc[1], "scalars": {}}


def test_the_rule_takes_the_best_fid_among_checkpoints_with_nothing_extracted_above_chance() -> None:
    points = [point(100, 60, 0, False), point(200, 40, 0, False), point(300, 30, 3, True), point(400, 25, 6, True)]
    chosen = SelectionRule().choose(points)
    assert chosen["step"] == 200 and chosen["utility"] == 40
    assert "from step 300 on the limits were broken" in chosen["reason"]
    assert SelectionRule(extraction_above_chance=True).choose(points)["step"] == 400
    # An MIA limit: step 200's AUC interval excludes 0.5, so the earlier one is chosen.
    points[1]["mia_auc_interval"] = [0.55, 0.8]
    assert SelectionRule(mia_auc_holds_half=True).choose(points)["step"] == 100
    assert SelectionRule().choose([point(100, 60, 2, True)]) is None


def test_a_trajectory_point_reads_the_audits_extraction_control_and_mia() -> None:
    result = {"scalars": {"audit/fid_x": 12.5, "audit/precision": 0.5},
              "extraction": {"union": {"extracted": 3, "member_ids": ["a", "b", "c"],
                                       "control": {"expected": 0.4, "interval": [0.0, 1.5], "above_chance": True, "combined_p_value": 0.01}}},
              "mia": {"loss": {"auc": 0.7, "auc_interval": [0.6, 0.8]}}}
    p = trajectory_point(300, result, 1.5)
    assert (p["step"], p["fid"], p["extracted"], p["chance"], p["above_chance"], p["mia_auc_interval"]) == (300, 12.5, 3, 0.4, True, [0.6, 0.8])
    assert SelectionRule().breaks(p) and SelectionRule(extraction_above_chance=True).breaks(p) == []


def test_the_tradeoff_figure_draws_one_line_per_setting_with_fid_and_none_without() -> None:
    from privdiff.eval.trajectory import tradeoff_figure

    runs = {name: {"trajectory": {"points": [point(s, 30 - s / 10 * k, s // 100 * k, s >= 200) for s in (100, 200, 300)]}}
            for k, name in ((1, "small"), (2, "large"))}
    fig = tradeoff_figure(runs)
    lines = [line for line in fig.axes[0].get_lines() if len(line.get_xdata()) == 3]
    assert [list(line.get_xdata()) for line in lines] == [[20, 10, 0], [10, -10, -30]]
    assert [y for line in lines for y in line.get_ydata()] == pytest.approx([0.8, 1.8, 2.8, 1.8, 3.8, 5.8])  # beyond chance 0.2
    for points in (r["trajectory"]["points"] for r in runs.values()):
        for p in points:
            p["fid"] = None
    assert tradeoff_figure(runs) is None


# -- through Lightning ----------------------------------------------------------------------------
def test_curves_reach_csv_and_tensorboard_and_the_report(tmp_path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    run_fit_cli([*args(tmp_path), "--run_dir", str(run), "--trainer.max_steps", "5", "--logging.tensorboard", "true",
                 "-c", "configs/audit/fast.yaml", "--audit.num_samples", "16", "--audit.steps", "2"])
    trajectory = json.loads((run / "trajectory.json").read_text())
    assert [p["step"] for p in trajectory["points"]] == [2, 4, 5]  # every 2 steps and after the last
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("audit/extracted")]
    csv_steps = sorted({int(float(r["step"])) for r in rows})
    assert csv_steps[:3] == [2, 4, 5]
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    tb = [(e.step, e.value) for e in events.Scalars("audit/mia_loss_auc")]
    assert [s for s, _ in tb][:3] == [2, 4, 5]
    assert [v for _, v in tb][:3] == pytest.approx([p["mia_auc"] for p in trajectory["points"]], abs=1e-6)
    audit = json.loads((run / "audit.json").read_text())
    assert [p["step"] for p in audit["trajectory"]["points"]] == [2, 4, 5]
    assert 0 < audit["trajectory"]["audit_share"] < 1
    html = (run / "report.html").read_text()
    assert "memorization through training" in html and "audited every 2 steps" in html
    assert "utility and memorization through training" not in html  # no FID in this profile: nothing to plot it on
    chosen = json.loads((run / "selected" / "selected.json").read_text())
    assert chosen["step"] in (2, 4, 5) and (run / "selected" / "model_index.json").is_file()
    assert [p.name for p in (run / "periodic_weights").iterdir()] == [f"step{chosen['step']:08d}.safetensors"]


def fake_audits(monkeypatch, above_from: int, calls: list[int]) -> None:
    """run_audit as a model that copies its members from step ``above_from`` on, with a FID that falls with the step."""

    def fake(model, data, config, defenses=None, run_dir=None, shard=None, training=None):
        step = calls[-1] + 2 if calls else 2
        calls.append(step)
        above = step >= above_from
        return {"scalars": {"audit/fid_fake": 100.0 - step, "audit/extracted": 5.0 if above else 0.0},
                "extraction": {"union": {"extracted": 5 if above else 0, "member_ids": [],
                                         "control": {"expected": 0.1, "interval": [0.0, 1.0], "above_chance": above,
                                                     "combined_p_value": 1e-4 if above else 1.0}}},
                "sampling": {"reject_rate": 0.0}}

    monkeypatch.setattr("privdiff.eval.periodic.run_audit", fake)


def test_a_memorization_budget_stops_the_run_and_the_last_checkpoint_within_it_is_exported(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    calls: list[int] = []
    fake_audits(monkeypatch, above_from=6, calls=calls)
    run = tmp_path / "run"
    cli = run_fit_cli([*args(tmp_path, 2, "2"), "--run_dir", str(run), "--trainer.max_steps", "40", "--audit", "null"])
    assert cli.trainer.global_step == 8  # above chance at 6 and 8: two audits in a row break the limits
    trajectory = json.loads((run / "trajectory.json").read_text())
    assert trajectory["stopped_early"] and trajectory["first_above_chance"] == 6
    assert trajectory["selected"]["step"] == 4  # the lowest FID (96) among steps 2 and 4
    selected = json.loads((run / "selected" / "selected.json").read_text())
    assert selected["step"] == 4 and "from step 6 on the limits were broken" in selected["reason"]
    # The export is step 4's EMA weights, not the final ones.
    from privdiff.train.models import load_model

    kept = load_model(run / "selected")
    final = load_model(run / "model")
    a = torch.cat([p.flatten() for p in kept.trainable_parameters()])
    b = torch.cat([p.flatten() for p in final.trainable_parameters()])
    assert not torch.equal(a, b)


@pytest.mark.slow
def test_a_killed_run_resumes_with_its_trajectory_and_selection(tmp_path, monkeypatch, fit_until_checkpoint_then_sigkill) -> None:
    monkeypatch.chdir(REPO)
    (tmp_path / "ckpt.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {filename: 'step{step:06d}', auto_insert_metric_name: false, save_last: true,\n"
        "                  every_n_train_steps: 4, save_top_k: 1, monitor: step, mode: max}\n")
    fit_args = [*args(tmp_path, 2)[1:], "-c", str(tmp_path / "ckpt.yaml"), "--audit", "null"]
    run = tmp_path / "run"
    fit_until_checkpoint_then_sigkill(fit_args, run, tmp_path / "killed.log", REPO, after_s=0.0)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    k = saved["global_step"]
    kept = saved["callbacks"]["PeriodicAudit"]["points"]
    assert [p["step"] for p in kept] == list(range(2, k + 1, 2))  # the checkpoint holds the audit of its own step
    total = k + 4
    run_fit_cli(["fit", *fit_args, "--run_dir", str(run), "--trainer.max_steps", str(total), "--ckpt_path", "last"])
    trajectory = json.loads((run / "trajectory.json").read_text())
    steps = [p["step"] for p in trajectory["points"]]
    assert steps == list(range(2, total + 1, 2))  # no step lost, none twice
    assert trajectory["points"][: len(kept)] == kept  # the points before the kill are the same figures
    chosen = json.loads((run / "selected" / "selected.json").read_text())
    assert chosen["step"] == trajectory["selected"]["step"] and (run / "selected" / "model_index.json").is_file()
