"""The report as a reader sees it: rendered by headless Chromium, holding every item it promises."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from privdiff.eval.audit import AuditConfig, AuditData, run_audit
from privdiff.eval.extraction import ExtractionAttack
from privdiff.eval.memorization import NNRatioMemorization
from privdiff.eval.mia import MembershipInference
from privdiff.eval.quality import SampleQuality
from privdiff.eval.report import write_report
from privdiff.train.data import load_builtin
from privdiff.train.pixel import PixelDiffusion

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Copier(PixelDiffusion):
    def __init__(self, images: torch.Tensor) -> None:
        super().__init__(16, 1, block_out_channels=(8, 16), attention_levels=(), num_train_timesteps=400)
        self.images, self.cursor = images, 0

    def sample(self, n, solver="ddim", steps=1, cond=None, generator=None):
        rows = (torch.arange(n) + self.cursor) % len(self.images)
        self.cursor += n
        return (self.images[rows] + 0.01 * torch.randn(n, *self.images.shape[1:], generator=generator)).clamp(0, 1)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    pool = load_builtin("digits", 16, 1)
    members, heldout = pool.select(range(64)), pool.select(range(64, 464))
    copies = torch.ones(64, dtype=torch.long)
    copies[:3] = 10
    config = AuditConfig(num_samples=64, steps=1, progress=False, attacks={
        "quality": SampleQuality(cache_dir=str(out / "cache")), "extraction": ExtractionAttack(min_clique=5),
        "memorization": NNRatioMemorization(), "mia": MembershipInference(examples=32, loss_timesteps=[10, 100], secmi_t=20, secmi_k=10),
    })
    runs, dirs = {}, {}
    for name, images in (("copies", members.unit()[:3]), ("novel", heldout.unit()[-40:])):
        dirs[name] = out / name
        runs[name] = run_audit(Copier(images), AuditData(members, heldout, copies, pool), config, run_dir=dirs[name])
        write_report(dirs[name], {name: runs[name]}, {name: dirs[name]})
    write_report(out, runs, dirs, title="report test", failed={"broken": "exit code 1: ValueError: data.path='/nope' does not exist"})
    return out


def test_the_report_files_hold_every_item(report: Path) -> None:
    md = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    for item in (
        "Thresholds", "calibrated to flag at most 1.0% of 200 held-out calibration images", "held-out flagged [95%]",
        "published", "sample sanity", "members (groups of near-copies) / training rows", "held-out: calibration / evaluation",
        "samples / solver", "training steps", "seed", "privdiff commit", "versions", "torch 2.14.1",
        "Membership inference", "AUC [95%]", "chosen on the other half", "Settings that failed", "/nope" ,
        "FID features: a small classifier", "held-out accuracy", "real vs real", "precision / recall",
    ):
        assert item in html, item
    assert "| copies |" in md and "## novel" in md and "Settings that failed" in md
    assert 'href="copies/report.html"' in html and 'href="novel/report.html"' in html
    # the verdict at the top: each setting's extraction beside its control, MIA with its interval, utility
    verdict = html[html.index("<h2>Verdict</h2>"):html.index("<h2>Privacy</h2>")]
    assert "<b><a href=\"copies/report.html\">copies</a></b>" in verdict and "no DP guarantee" in verdict
    assert verdict.count("extraction: ") == 2 and verdict.count("membership inference: AUC ") == 2
    assert "above" in verdict.split("novel")[0] and "utility: FID " in verdict
    assert html.index("<h2>Privacy</h2>") < html.index("<h2>Utility and cost</h2>") < html.index("<h2>Notes</h2>")
    assert "<h3>extraction</h3>" in html and "<h3>mia</h3>" in html  # notes grouped by attack
    for figure in ("privacy–utility", "memorization vs copies", "membership inference ROC", "most-extracted cases: copies"):
        assert f"<figcaption>{figure}" in html, figure


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs it)")
def test_the_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    page = f"file://{report / 'report.html'}"
    dom = subprocess.run([*args, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert "report test" in dom and "Thresholds" in dom and dom.count("<img") >= 4
    shot = tmp_path / "report.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=1300,2400", page], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as image:
        pixels = image.convert("L").resize((65, 120))
        values = list(pixels.getdata())
    assert max(values) - min(values) > 100  # text and figures drawn, not a blank page


def laid_out_width(html_file: Path, tmp_path: Path) -> tuple[int, float]:
    """The page's scroll width and its tables' right edge as headless Chromium lays the page out at 1280 px."""
    import re

    page = tmp_path / f"measured_{html_file.parent.name}.html"
    probe = ("<script>document.title = 'W' + document.documentElement.scrollWidth + ' T' + "
             "Math.max(...[...document.querySelectorAll('table')].map(t => t.getBoundingClientRect().right));</script>")
    page.write_text(html_file.read_text().replace("</body>", probe + "</body>"))
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900", "--dump-dom", f"file://{page}"]
    dom = subprocess.run(args, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"<title>W(\d+) T([\d.]+)</title>", dom)
    assert found, dom[:500]
    return int(found.group(1)), float(found.group(2))


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs it)")
def test_the_report_fits_a_laptop_screen_1280_pixels_wide(report: Path, tmp_path: Path) -> None:
    """No horizontal scrolling at 1280 px, tables included: for the pixel audit, and for a text-to-image comparison's
    privacy table: ten attack columns of long cells beside the fixed five, defenses with long names (`make demo-t2i`
    writes nine and the canaries add one)."""
    width, tables = laid_out_width(report / "report.html", tmp_path)
    assert width <= 1280 and tables <= 1280, (width, tables)
    cell = "0/32 (4 unscreened) · chance 0.0 [0.0, 2.4] · above (p 0.023)"
    columns = [{"key": f"c{i}", "header": f"captions extracted · chance {i}", "unit": "", "role": "privacy" if i < 8 else "",
                "value": i, "text": cell} for i in range(10)]
    columns.append({"key": "fid", "header": "FID", "unit": "", "role": "utility", "value": 11.1, "text": "11.1 (small-classifier-64d)"})
    audit = {"privacy": {"epsilon": 10.0, "delta": 1e-5, "accountant": "prv", "holds": True, "known": True},
             "run": {"defenses": "dp_sgd(eps<=10, delta=1e-05) + dedup(phash≤8,l2≤0.045)", "train_time_s": 113.0},
             "plugins": {"attacks": {"columns": columns[:10], "notes": ["How it works."]},
                         "quality": {"columns": columns[10:], "notes": []}}}
    write_report(tmp_path / "wide", {name: audit for name in ("caption_randomization", "prompt_mitigation", "none")},
                 title="a wide text-to-image comparison")
    width, tables = laid_out_width(tmp_path / "wide" / "report.html", tmp_path)
    assert width <= 1280 and tables <= 1280, (width, tables)


def test_a_note_that_differs_between_settings_names_them_and_one_they_share_is_said_once() -> None:
    from privdiff.eval.report import _notes

    def audit(*notes: str) -> dict:
        return {"plugins": {"detection": {"notes": list(notes)}}}

    runs = {"none": audit("How it works.", "3 copies."), "dedup": audit("How it works.", "0 copies."),
            "mitigation": audit("How it works.", "3 copies.")}
    assert _notes(runs) == ["How it works.", "none, mitigation: 3 copies.", "dedup: 0 copies."]
    assert _notes({"none": audit("How it works.", "3 copies.")}) == ["How it works.", "3 copies."]
