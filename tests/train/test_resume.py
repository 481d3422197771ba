"""Crash and resume through the real CLI: the privacy budget survives, checkpoints are atomic, changes are refused."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from opacus.accountants import create_accountant

from privdiff.train.checkpoint_io import SafeCheckpointIO
from privdiff.cli import run_fit_cli

REPO = Path(__file__).resolve().parents[2]
CKPT_EVERY_3 = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {filename: "step{step:06d}", auto_insert_metric_name: false, save_last: true,
                  every_n_train_steps: 3, save_top_k: 1, monitor: step, mode: max}
"""
# The shipped DP config with a fixed sigma (the hint of the issue), a small UNet and a tiny member set:
# 32 members + 2 images planted 3x, which dedup removes again; batch 2 -> q = 2/32, 16 Poisson batches an epoch.
SMALL = ["--model.diffusion.block_out_channels", "[16, 32]", "--trainer.enable_progress_bar", "false", "--audit", "null",
         "--trainer.log_every_n_steps", "1"]


def dp_args(tmp_path: Path, defense: str = "configs/defense/dedup_dp_sgd.yaml", sigma: str = "1.0", **data: str) -> list[str]:
    (tmp_path / "ckpt_every_3.yaml").write_text(CKPT_EVERY_3)
    data = {"num_members": "32", "num_heldout": "8", "batch_size": "4", "duplicate_images": "2", "duplicate_copies": "3", **data}
    args = ["-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "-c", defense, "-c", str(tmp_path / "ckpt_every_3.yaml")]
    for key, value in data.items():
        args += [f"--data.{key}", value]
    return [*args, "--data.defenses.init_args.target_epsilon", "null", "--data.defenses.init_args.noise_multiplier", sigma, *SMALL]


def fit(args: list[str], run_dir: Path, max_steps: int, *extra: str):
    return run_fit_cli(["fit", *args, "--run_dir", str(run_dir), "--trainer.max_steps", str(max_steps), *extra])


def epsilon(history, accountant: str = "prv", delta: float = 1e-5) -> float:
    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    return acc.get_epsilon(delta=delta)


# -- 1. SIGKILL mid-epoch, resume, compare with an uninterrupted run ------------------------------------
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_spends_what_an_uninterrupted_run_spends(tmp_path, monkeypatch, fit_until_checkpoint_then_sigkill) -> None:
    monkeypatch.chdir(REPO)
    args, run = dp_args(tmp_path, batch_size="2"), tmp_path / "killed"
    last = run / "checkpoints" / "last.ckpt"
    pid = fit_until_checkpoint_then_sigkill(args, run, tmp_path / "killed.log", REPO)
    manifest_before = json.loads((run / "manifest.json").read_text())
    assert len(manifest_before["removed"]) == 4  # dedup removed the 2 x 2 planted copies

    saved = torch.load(last, weights_only=True)
    k = saved["global_step"]
    assert k % 3 == 0 and k % 16 != 0  # saved in the middle of an epoch of 16 Poisson batches
    dp_state = saved["defenses"]["dp_sgd"]
    assert dp_state["steps"] == k and [list(h) for h in dp_state["accountant"]["history"]] == [[1.0, 2 / 32, k]]
    assert saved["ema"]["optimization_step"] == k  # the EMA of every counted step is in the checkpoint

    # What the killed process left: its metrics rows, a save cut short, a checkpoint of a step after last.ckpt's.
    with open(run / "metrics.csv") as f:
        rows_before = [r for r in csv.DictReader(f) if float(r["step"]) <= k]
    assert rows_before
    (run / "checkpoints" / f".last.ckpt.{pid}.tmp").write_bytes(b"")
    torch.save({"global_step": k + 50}, run / "checkpoints" / f"step{k + 50:06d}.ckpt")

    total = k + 4
    resumed = fit(args, run, total, "--ckpt_path", "last")
    with open(run / "metrics.csv") as f:
        rows_after = list(csv.DictReader(f))
    kept = [{key: r[key] for key in rows_before[0]} for r in rows_after[: len(rows_before)]]
    assert kept == rows_before  # the rows before the resume are kept (Lightning's CSV logger deleted them)
    assert max(float(r["step"]) for r in rows_after) <= total
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert (run / "checkpoints" / "abandoned" / f"step{k + 50:06d}.ckpt").is_file()
    assert json.loads((run / "manifest.json").read_text()) == manifest_before  # same split, same dedup result
    d = resumed.model.defenses.find("dp_sgd")
    assert resumed.trainer.global_step == d.steps == total
    assert d.accountant.history == [(1.0, 2 / 32, total)]  # neither reset nor a lost step counted twice

    straight = fit(args, tmp_path / "straight", total)
    s = straight.model.defenses.find("dp_sgd")
    assert s.accountant.history == d.accountant.history
    assert d.epsilon() == pytest.approx(s.epsilon(), rel=1e-12)
    assert d.epsilon() > epsilon([(1.0, 2 / 32, k)])  # grew from the checkpoint's epsilon, never reset


# -- atomic saves ---------------------------------------------------------------------------------------
def test_an_interrupted_save_and_a_stray_temp_file_leave_last_ckpt_usable(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    args = dp_args(tmp_path, defense="configs/defense/dp_sgd.yaml", num_members="16", duplicate_images="0")
    cli = fit(args, tmp_path, 3)
    io = cli.trainer.strategy.checkpoint_io
    assert isinstance(io, SafeCheckpointIO)
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    real_save = torch.save

    def save_half_then_die(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 99}, last)
    monkeypatch.setattr(torch, "save", real_save)
    assert last.read_bytes() == before and torch.load(last, weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in last.parent.iterdir()) == sorted(["last.ckpt", "step000003.ckpt"])  # no temp left

    # The temp file goes next to the target (one filesystem: os.replace is atomic) ...
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append((Path(src), Path(dst))), real_replace(src, dst)))
    io.save_checkpoint(torch.load(last, weights_only=True), tmp_path / "checkpoints" / "copy.ckpt")
    monkeypatch.setattr(os, "replace", real_replace)
    assert replaced and replaced[0][0].parent == replaced[0][1].parent
    (tmp_path / "checkpoints" / "copy.ckpt").unlink()

    # ... and what a SIGKILL during a save leaves behind (a truncated temp file) is never resumed from.
    (last.parent / f".last.ckpt.{os.getpid() + 1}.tmp").write_bytes(before[: len(before) // 3])
    (last.parent / "last.ckpt.tmp").write_bytes(b"garbage")
    resumed = fit(args, tmp_path, 5, "--ckpt_path", "last")
    assert resumed.trainer.global_step == resumed.model.defenses.find("dp_sgd").steps == 5


# -- 2. the budget: a changed sigma, batch size or data size is refused unless new_budget ------------------
@pytest.mark.slow
def test_resume_with_changed_privacy_settings_is_refused_unless_a_new_budget_is_asked_for(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    plain = dict(defense="configs/defense/dp_sgd.yaml", num_members="16", duplicate_images="0")
    run = tmp_path / "run"
    fit(dp_args(tmp_path, **plain), run, 3)
    last = run / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"noise_multiplier 1 -> 2.*new_budget: true"):
        fit(dp_args(tmp_path, sigma="2.0", **plain), run, 5, "--ckpt_path", "last")
    with pytest.raises(ValueError, match=r"sample rate 0.25 -> 0.5.*new_budget"):
        fit(dp_args(tmp_path, **{**plain, "batch_size": "8"}), run, 5, "--ckpt_path", "last")
    with pytest.raises(ValueError, match="no longer match the manifest"):  # more data, same run directory
        fit(dp_args(tmp_path, **{**plain, "num_members": "24"}), run, 5, "--ckpt_path", "last")
    with pytest.raises(ValueError, match=r"training rows 16 -> 24.*new_budget"):  # more data, a new run directory
        fit(dp_args(tmp_path, **{**plain, "num_members": "24"}), tmp_path / "bigger", 5, "--ckpt_path", str(last))

    cli = fit(dp_args(tmp_path, sigma="2.0", **plain), run, 5, "--ckpt_path", "last", "--data.defenses.init_args.new_budget", "true")
    d = cli.model.defenses.find("dp_sgd")
    assert d.accountant.history == [(1.0, 0.25, 3), (2.0, 0.25, 2)]  # composed with what was spent
    assert d.epsilon() > epsilon([(1.0, 0.25, 3)])


def test_a_checkpoint_trained_without_dp_is_not_resumed_under_dp_as_if_nothing_was_spent(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    base = ["-c", "configs/base.yaml", "-c", "configs/data/digits.yaml", "--data.num_members", "16", "--data.num_heldout", "8",
            "--data.batch_size", "4", "--data.duplicate_images", "0", *SMALL]
    fit(base, tmp_path, 2)
    dp = [*base, "-c", "configs/defense/dp_sgd.yaml", "--data.defenses.init_args.target_epsilon", "null",
          "--data.defenses.init_args.noise_multiplier", "1.0"]
    with pytest.raises(ValueError, match="2 training steps ran without dp_sgd.*new_budget: true"):
        fit(dp, tmp_path, 4, "--ckpt_path", "last")


@pytest.mark.slow
def test_a_new_budget_never_lets_a_target_epsilon_be_exceeded(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    args = dp_args(tmp_path, defense="configs/defense/dp_sgd.yaml", num_members="16", duplicate_images="0")
    args = args[: args.index("--data.defenses.init_args.target_epsilon")] + SMALL
    args += ["--data.defenses.init_args.target_epsilon", "4.0", "--data.defenses.init_args.steps", "8",
             "--data.defenses.init_args.accountant", "rdp"]
    first = fit(args, tmp_path, 2)
    spent = first.model.defenses.find("dp_sgd").epsilon()
    assert 0 < spent < 4.0
    # new_budget plans sigma again for 8 steps as if nothing was spent; the stop still holds the target.
    cli = fit(args, tmp_path, 40, "--ckpt_path", "last", "--data.defenses.init_args.new_budget", "true")
    d = cli.model.defenses.find("dp_sgd")
    assert spent < d.epsilon() <= 4.0 and d.steps == cli.trainer.global_step < 40
    assert "budget" in d.should_stop()


# -- DP randomness: fresh at every process start, never replayed by a resume ---------------------------
STEP_LOG = REPO / "tests" / "train" / "dp_step_log.py"


def _start_logged_fit(args: list[str], run: Path, log: Path, max_steps: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    out = open(log.with_suffix(f".{max_steps}.out"), "w")
    cmd = [sys.executable, str(STEP_LOG), str(log), "fit", *args, "--run_dir", str(run), "--trainer.max_steps", str(max_steps), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _steps(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_a_resumed_dp_run_never_replays_a_batch_with_its_noise(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    # 32 rows, batch 2: q = 1/16, 16 Poisson batches an epoch; a checkpoint every 3 steps.
    args = dp_args(tmp_path, defense="configs/defense/dp_sgd.yaml", batch_size="2", duplicate_images="0")
    run, log = tmp_path / "run", tmp_path / "steps.jsonl"
    last = run / "checkpoints" / "last.ckpt"
    proc = _start_logged_fit(args, run, log, 100000)
    try:
        deadline = time.monotonic() + 120
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        assert proc.poll() is None, log.with_suffix(".100000.out").read_text()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = _steps(log)
    k = torch.load(last, weights_only=True)["global_step"]
    assert k >= 3 and len(killed) >= k  # steps after the checkpoint ran and are lost
    total = k + 20  # more than an epoch: the old bug replayed steps 1, 2, ... from the epoch start
    resumed = _start_logged_fit(args, run, log, total, "--ckpt_path", "last")
    assert resumed.wait(240) == 0, log.with_suffix(f".{total}.out").read_text()[-3000:]
    after = [s for s in _steps(log) if s["pid"] == resumed.pid]
    assert [s["step"] for s in after] == list(range(k, total))
    earlier = {(tuple(s["rows"]), s["noise"]) for s in killed}
    assert not [s for s in after if (tuple(s["rows"]), s["noise"]) in earlier]  # no batch replayed with its noise
    noises = [s["noise"] for s in killed + after]
    assert len(set(noises)) == len(noises)  # every step drew fresh noise


@pytest.mark.slow
def test_two_dp_runs_with_the_same_seed_draw_different_batches_and_noise(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    args = dp_args(tmp_path, defense="configs/defense/dp_sgd.yaml", num_members="16", duplicate_images="0")
    logs = []
    for name in ("a", "b"):
        proc = _start_logged_fit(args, tmp_path / name, tmp_path / f"{name}.jsonl", 4)
        assert proc.wait(240) == 0, (tmp_path / f"{name}.4.out").read_text()[-3000:]
        logs.append(_steps(tmp_path / f"{name}.jsonl"))
    a, b = logs
    assert len(a) == len(b) == 4
    assert not {s["noise"] for s in a} & {s["noise"] for s in b}
    assert [s["rows"] for s in a] != [s["rows"] for s in b]  # P(the same 4 Poisson batches) ~ 1e-3 at q = 1/4
    wa = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(not torch.equal(wa[key], wb[key]) for key in wa)


def test_a_finished_runs_last_checkpoint_is_its_final_step_and_a_resume_that_trains_released_steps_again_counts_them(tmp_path, monkeypatch) -> None:
    """Checkpoints every 3 steps, 10 steps: last.ckpt holds step 10, not 9. Resuming from step 9 trains step 10
    again after its first run was exported: the accountant counts both runs (11 steps), and says so."""
    monkeypatch.chdir(REPO)
    args, run = dp_args(tmp_path, defense="configs/defense/dp_sgd.yaml"), tmp_path / "run"
    first = fit(args, run, 10)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 10 and last["defenses"]["dp_sgd"]["steps"] == 10 == first.model.defenses.find("dp_sgd").steps
    assert json.loads((run / "released.json").read_text()) == {"global_step": 10}

    again = fit(args, run, 10, "--ckpt_path", "last")  # a finished run resumed: nothing is trained again or counted twice
    assert again.trainer.global_step == 10 and again.model.defenses.find("dp_sgd").steps == 10

    older = run / "checkpoints" / "step000009.ckpt"
    assert torch.load(older, weights_only=True)["global_step"] == 9
    resumed = fit(args, run, 10, "--ckpt_path", str(older))
    assert resumed.trainer.global_step == 10 and resumed.model.defenses.find("dp_sgd").steps == 11
    assert json.loads((run / "defenses.json").read_text())["metrics"]["defense/dp_sgd/steps"] == 11

    fresh = fit(args, tmp_path / "fresh", 4)  # a new run's ledger starts empty
    assert json.loads((tmp_path / "fresh" / "released.json").read_text()) == {"global_step": 4}
    assert fresh.model.defenses.find("dp_sgd").steps == 4
