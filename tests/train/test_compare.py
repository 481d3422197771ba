"""A shrunk `privdiff compare`: report files with every column, figures, reuse of finished runs; the diffusion-vs-GAN
grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from privdiff.compare import Setting, compare, report_title
from privdiff.eval.report import privacy_utility_figure, summarize

REPO = Path(__file__).resolve().parents[2]
SHRUNK = ["--trainer.max_steps=3", "--trainer.enable_progress_bar=false", "--data.num_members=24", "--data.num_heldout=8",
          "--data.duplicate_images=2", "--data.duplicate_copies=3", "--audit.num_samples=16", "--audit.attacks.mia.examples=8"]


@pytest.mark.slow
def test_shrunk_compare_writes_every_column_and_reuses_finished_runs(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    settings = {
        "none": Setting(),
        "output_filter": Setting(configs=["configs/defense/output_filter_digits.yaml"], audit_of="none"),
    }
    configs = ["configs/base.yaml", "configs/data/digits.yaml", "configs/audit/fast.yaml"]
    audits = compare(settings, configs, SHRUNK, out_dir=str(tmp_path), parallel=1)
    assert set(audits) == {"none", "output_filter"}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema"] == "privdiff.report/2"
    headers = ["setting", "defense", "ε (δ, accountant)", "FID", "KID", "precision / recall", "extracted · chance", "NN-ratio mem.",
               "best MIA AUC", "TPR@low FPR", "rows removed", "reject rate", "train time"]
    assert [c["header"] for c in report["columns"].values()] == headers  # the attacks' columns, in config order
    for row in report["rows"]:
        assert set(report["columns"]) <= set(row["text"])
        assert "classifier" in row["text"]["fid"]
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.splitlines()[2] == "| " + " | ".join(headers) + " |"
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "privacy–utility" in html and "membership inference ROC" in html
    assert 'href="none/report.html"' in html and 'href="output_filter/report.html"' in html  # each setting's own report
    for item in ("Thresholds", "calibration images", "sample sanity", "held-out: calibration / evaluation",
                 "privdiff commit", "versions", "Membership inference", "chosen on the other half"):
        assert item in html, item
    assert "output_filter: output_filter gives no DP guarantee" in markdown
    assert audits["output_filter"]["sampling"]["num_drawn"] >= 16
    assert "defense/output_filter/reject_rate" in audits["output_filter"]["defense_metrics"]
    # The audit_of row is audited with its neighbour's settings, shared args included (16 samples, not fast.yaml's 64).
    assert audits["output_filter"]["config"] == audits["none"]["config"] and audits["none"]["config"]["num_samples"] == 16
    stamp = (tmp_path / "none" / "audit.json").stat().st_mtime
    printed = capsys.readouterr().out
    breakdown = printed[printed.index("time per stage (s)"):].splitlines()
    assert breakdown[0].endswith("setting | train | sample | quality | extraction | memorization | mia")
    assert breakdown[1].startswith("  none | ") and breakdown[2].startswith("  output_filter | ")
    assert breakdown[3].startswith("  report (all settings): ")
    compare(settings, configs, SHRUNK, out_dir=str(tmp_path), parallel=1)
    assert "reusing finished run" in capsys.readouterr().out
    assert (tmp_path / "none" / "audit.json").stat().st_mtime == stamp


def test_compare_rejects_unknown_audit_of(tmp_path) -> None:
    with pytest.raises(ValueError, match="audit_of='nope'"):
        compare({"a": Setting(audit_of="nope")}, [], out_dir=str(tmp_path))


@pytest.mark.slow
def test_the_gan_grid_shrunk_puts_the_gan_row_in_the_table_the_report_and_the_privacy_utility_plot(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    shipped = yaml.safe_load((REPO / "configs" / "compare" / "gan.yaml").read_text())
    # the shipped grid's configs and settings; each setting's own step count gives way to the shrunk one
    settings = {name: Setting(configs=s["configs"], args=["--trainer.max_steps=3"]) for name, s in shipped["settings"].items()}
    assert set(settings) == {"none", "gan"}
    shrunk = [*SHRUNK[1:-1], "--audit.steps=10", "--audit.attacks.mia.init_args.examples=4",
              "--audit.attacks.gan_mia.init_args.examples=4"]
    audits = compare(settings, shipped["configs"], [*shipped["args"], *shrunk], out_dir=str(tmp_path), parallel=1,
                     title=shipped["title"])
    assert audits["gan"]["model"]["kind"] == "gan" and audits["gan"]["run"]["steps"] == 3
    # each membership attack answers for its own kind of model and says n/a for the other
    assert "not_applicable" in audits["gan"]["mia"] and "auc" in audits["gan"]["gan_mia"]
    assert "not_applicable" in audits["none"]["gan_mia"] and "best" in audits["none"]["mia"]
    printed = capsys.readouterr().out
    assert "\n| gan | none | none | " in printed  # the table `privdiff compare` prints
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["setting"] for r in report["rows"]] == ["none", "gan"]
    assert {"best MIA AUC", "LOGAN AUC"} <= {c["header"] for c in report["columns"].values()}
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# privdiff: diffusion vs GAN") and "| gan | none | none | " in markdown
    html = (tmp_path / "report.html").read_text()
    assert "privacy–utility" in html and 'href="gan/report.html"' in html
    # the GAN is a point wherever its column is a number (not on the diffusion MIA's axis, where it is n/a); no ε needed
    fig = privacy_utility_figure([summarize(n, a) for n, a in audits.items()])
    points = {ax.get_xlabel().split("\n")[0]: [c.get_label() for c in ax.collections] for ax in fig.axes}
    assert points["extracted · chance"] == points["NN-ratio mem."] == ["none", "gan"], points
    assert points["LOGAN AUC"] == ["gan"] and points["best MIA AUC"] == ["none"]


def test_a_report_title_says_which_data_the_args_put_in_place_of_the_configs() -> None:
    title = "quickstart: digits 16x16"
    assert report_title(title, ["--trainer.max_steps=50"]) == title
    got = report_title(title, ["--trainer.max_steps=50", "--data.source=faces", "--data.image_size", "24"])
    assert got == "quickstart: digits 16x16 (data overridden: data.source=faces, data.image_size=24)"
