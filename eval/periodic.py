"""Audit through training: a light audit every N steps on the EMA weights, its trajectory, and the checkpoint to ship.

Memorization grows with training: a model that copies nothing at one step regurgitates its duplicated images a few
hundred steps later. One audit after the last step cannot show when that began, nor keep the last checkpoint before
it. :class:`PeriodicAudit` runs the audit suite (a light profile: few samples, few sampler steps) every
``every_n_steps`` on the EMA weights, logs its scalars as ``audit/...`` curves to every logger, keeps a trajectory
(``trajectory.json`` in the run directory, and in the checkpoints, so a resume keeps it), and applies a
:class:`SelectionRule`: the lowest FID among the audited checkpoints with nothing extracted above chance (and, if
asked, an MIA AUC interval that holds 0.5). That checkpoint's EMA weights are exported as a second diffusers folder,
``selected/``, beside the final ``model/``. With ``stop_after`` it also stops training once the rule's limits are
broken that many audits in a row, in the manner of Lightning's ``EarlyStopping``: a memorization budget.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from privdiff.files import atomic_path
from .audit import AuditConfig, datamodule_audit_data, flat_metrics, run_audit, write_json

__all__ = ["PeriodicAudit", "PeriodicAuditConfig", "SelectionRule", "light_profile", "trajectory_point", "TRAJECTORY"]

TRAJECTORY = "trajectory.json"
SELECTED = "selected"
_WEIGHTS = "periodic_weights"  # the EMA weights of each checkpoint that was the rule's choice when it was audited


def light_profile() -> AuditConfig:
    """The periodic audit's default suite: 128 samples at 25 sampler steps, FID, extraction and NN-ratio with their
    controls, the loss-threshold MIA on 32 members and 32 held-out images."""
    return AuditConfig(
        num_samples=128, steps=25, batch_size=128, progress=False,
        attacks={
            "quality": {"class_path": "privdiff.eval.quality.SampleQuality", "init_args": {"backbone": "classifier"}},
            "extraction": {"class_path": "privdiff.eval.extraction.ExtractionAttack", "init_args": {"min_clique": 4}},
            "memorization": {"class_path": "privdiff.eval.memorization.NNRatioMemorization"},
            "mia": {"class_path": "privdiff.eval.mia.MembershipInference",
                    "init_args": {"attacks": ["loss"], "examples": 32, "loss_timesteps": [100, 200]}},
        },
    )


def trajectory_point(step: int, result: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """What the trajectory keeps of one audit (``audit.json`` dict) at a training step."""
    scalars = dict(result.get("scalars") or {})
    union = (result.get("extraction") or {}).get("union") or {}
    control = union.get("control") or {}
    loss = (result.get("mia") or {}).get("loss") or {}
    fid = next((float(v) for k, v in scalars.items() if k.startswith("audit/fid")), None)
    point = {
        "step": int(step),
        "fid": fid,
        "precision": scalars.get("audit/precision"),
        "recall": scalars.get("audit/recall"),
        "extracted": union.get("extracted"),
        "extracted_ids": list(union.get("member_ids") or []),
        "chance": control.get("expected"),
        "chance_interval": control.get("interval"),
        "above_chance": control.get("above_chance"),
        "p_value": control.get("combined_p_value"),
        "nn_ratio_memorized": scalars.get("audit/nn_ratio_memorized"),
        "mia_auc": loss.get("auc"),
        "mia_auc_interval": loss.get("auc_interval"),
        "scalars": scalars,
        "seconds": float(seconds),
    }
    detection = result.get("detection") or {}
    for name in ("one_step", "magnitude"):
        scores = (detection.get(name) or {}).get("member_scores")
        if scores:
            planted = [s["score"] for s in scores if s["rows"] > 1]
            point[f"detection_{name}"] = {"planted_mean": sum(planted) / len(planted) if planted else None,
                                          "heldout_mean": detection[name].get("heldout_mean"),
                                          "auc": detection[name].get("auc_duplicated_vs_rest")}
    prompt = result.get("prompt_extraction") or {}
    if prompt:
        point["prompt_extraction"] = {"extracted": prompt.get("extracted"), "planted_found": prompt.get("planted_found"),
                                      "planted": prompt.get("planted"), "heldout_flagged": prompt.get("heldout_flagged"),
                                      "above_chance": (prompt.get("control") or {}).get("above_chance")}
    return json.loads(json.dumps(point, default=float))  # plain JSON values: the same after a checkpoint or a file


@dataclass
class SelectionRule:
    """Which audited checkpoint to ship: the best utility among those within the memorization limits.

    Args:
        utility: the point's field to minimise (``fid``), or an ``audit/...`` scalar; where a point has none (an
            audit without FID), the latest checkpoint within the limits is chosen.
        extraction_above_chance: allow checkpoints whose extraction count is above what the held-out control gives
            by chance (False: such a checkpoint is never chosen).
        mia_auc_holds_half: also require the loss attack's AUC interval to hold 0.5 (on an undefended model it
            excludes 0.5 long before anything is extracted; under DP-SGD it is the natural limit).
    """

    utility: str = "fid"
    extraction_above_chance: bool = False
    mia_auc_holds_half: bool = False

    def breaks(self, point: Mapping[str, Any]) -> list[str]:
        """The limits ``point`` breaks, in words (empty: within them)."""
        broken = []
        if not self.extraction_above_chance and point.get("above_chance"):
            broken.append(f"{point['extracted']} extracted against chance {point['chance']:.1f} (p {point['p_value']:.2g})")
        interval = point.get("mia_auc_interval")
        if self.mia_auc_holds_half and interval and not interval[0] <= 0.5 <= interval[1]:
            broken.append(f"MIA AUC {point['mia_auc']:.2f} [{interval[0]:.2f}, {interval[1]:.2f}] excludes 0.5")
        return broken

    def value(self, point: Mapping[str, Any]) -> float:
        v = point.get(self.utility, (point.get("scalars") or {}).get(self.utility))
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf

    def choose(self, points: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
        """The chosen point's step and the reason, in words; None when no audited checkpoint is within the limits."""
        within = [p for p in points if not self.breaks(p)]
        if not within:
            return None
        best = min(within, key=lambda p: (self.value(p), -p["step"]))
        limits = "nothing extracted above chance" if not self.extraction_above_chance else "any extraction"
        if self.mia_auc_holds_half:
            limits += " and an MIA AUC interval that holds 0.5"
        later = [p["step"] for p in points if p["step"] > best["step"] and self.breaks(p)]
        reason = (f"the lowest {self.utility} ({self.value(best):.4g}) of the {len(within)} of {len(points)} audited checkpoints "
                  f"with {limits}" if math.isfinite(self.value(best)) else
                  f"the latest of the {len(within)} of {len(points)} audited checkpoints with {limits} (none has a {self.utility})")
        if later:
            reason += f"; from step {later[0]} on the limits were broken"
        value = self.value(best)
        return {"step": best["step"], "utility": value if math.isfinite(value) else None, "reason": reason}


@dataclass
class PeriodicAuditConfig:
    """The audit through training (``periodic_audit:`` in a config; null: none).

    Args:
        every_n_steps: audit after every this many training steps (and after the last).
        profile: the light audit run each time (default :func:`light_profile`); its seed is the same every time, so
            the points differ by the weights only.
        selection: the rule that picks the checkpoint to export as ``selected/`` (null: no selection).
        stop_after: stop training when this many audits in a row break the selection rule's limits (null: never).
    """

    every_n_steps: int = 100
    profile: AuditConfig = field(default_factory=light_profile)
    selection: SelectionRule | None = field(default_factory=SelectionRule)
    stop_after: int | None = None

    def __post_init__(self) -> None:
        if self.every_n_steps < 1:
            raise ValueError(f"periodic_audit.every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.stop_after is not None and (self.stop_after < 1 or self.selection is None):
            raise ValueError("periodic_audit.stop_after needs a selection rule (its limits are the budget) and must be >= 1")


class PeriodicAudit(pl.Callback):
    """Runs :class:`PeriodicAuditConfig`'s audit every N steps; see the module's docstring.

    It reads the data module's ``members``, ``heldout`` and ``manifest`` and the module's ``ema_model()`` and
    ``defenses``, as the final audit does. Under DDP every process samples its share and every process gets the
    same figures (so a stop is decided alike); rank 0 writes and logs.
    """

    def __init__(self, config: PeriodicAuditConfig | None = None) -> None:
        self.config = config or PeriodicAuditConfig()
        self.points: list[dict[str, Any]] = []
        self.selected: dict[str, Any] | None = None
        self.audit_seconds = 0.0
        self.train_seconds = 0.0
        self._violations = 0
        self._started: float | None = None

    @property
    def state_key(self) -> str:
        return "PeriodicAudit"

    # -- checkpoints: a resume keeps the trajectory -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"points": self.points, "selected": self.selected, "audit_seconds": self.audit_seconds,
                "train_seconds": self._train_seconds_now(), "violations": self._violations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.points = list(state.get("points", []))
        self.selected = state.get("selected")
        self.audit_seconds = float(state.get("audit_seconds", 0.0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self._violations = int(state.get("violations", 0))

    def _train_seconds_now(self) -> float:
        return self.train_seconds + (time.perf_counter() - self._started if self._started is not None else 0.0)

    # -- hooks -------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if getattr(dm, "heldout", None) is not None and getattr(dm, "members", None) is not None:
            self.config.profile.check(len(dm.members), len(dm.heldout))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        # A resume from an earlier checkpoint redoes the steps after it: their points go, as their metrics rows do.
        self.points = [p for p in self.points if p["step"] <= step]
        if self.selected is not None and self.selected["step"] > step:
            self.selected = None
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.config.every_n_steps == 0 and not self._audited(step):
            self._audit(trainer, pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step > 0 and not self._audited(step):
            self._audit(trainer, pl_module, step)
        if self._started is not None:
            self.train_seconds = self._train_seconds_now()
            self._started = None
        if trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            if self.selected is not None:
                self._export_selected(pl_module, run_dir)
            self._write(run_dir, final=True)

    # -- the audit ---------------------------------------------------------------------------------
    def _audited(self, step: int) -> bool:
        return any(p["step"] == step for p in self.points)

    def _audit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        distributed = trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        shard = (trainer.global_rank, trainer.world_size) if distributed else None
        dm = trainer.datamodule
        data = datamodule_audit_data(dm)
        start = time.perf_counter()
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with pl_module.ema_model() as model, torch.random.fork_rng(devices=devices):
            # fork_rng: the audit's own seeding must not shift the training's random stream
            result = run_audit(model, data, self.config.profile, pl_module.defenses, None, shard=shard)
            weights = [p.detach().to("cpu", copy=True) for p in model.trainable_parameters()]
        seconds = time.perf_counter() - start
        self.audit_seconds += seconds
        point = trajectory_point(step, result, seconds)
        self.points.append(point)
        rule = self.config.selection
        if rule is not None:
            broken = rule.breaks(point)
            self._violations = self._violations + 1 if broken else 0
            # the same order as SelectionRule.choose: the lower utility, the later step on a tie (no FID: the latest)
            if not broken and (self.selected is None or rule.value(point) <= self.selected["utility"]):
                self.selected = {"step": step, "utility": rule.value(point)}
                if trainer.is_global_zero:
                    self._keep_weights(Path(trainer.default_root_dir), step, weights)
            if self.config.stop_after is not None and self._violations >= self.config.stop_after:
                stop = trainer.strategy.reduce_boolean_decision(True, all=False)
                if stop:
                    trainer.should_stop = True
                    rank_zero_info(f"privdiff: stopping training at step {step}: the memorization budget is spent "
                                   f"({'; '.join(broken)}, {self._violations} audit(s) in a row)")
        if trainer.is_global_zero:
            metrics = {**flat_metrics(result), "audit/above_chance": float(bool(point["above_chance"])),
                       "audit/periodic_seconds": seconds}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            self._write(Path(trainer.default_root_dir))
        rank_zero_info(f"privdiff: periodic audit at step {step}: FID {point['fid'] if point['fid'] is None else round(point['fid'], 3)}, "
                       f"extracted {point['extracted']} (chance {point['chance']}), {seconds:.1f} s")

    # -- files -------------------------------------------------------------------------------------
    @staticmethod
    def _keep_weights(run_dir: Path, step: int, weights: list[torch.Tensor]) -> None:
        from safetensors.torch import save_file

        with atomic_path(run_dir / _WEIGHTS / f"step{step:08d}.safetensors") as tmp:
            save_file({str(i): w.contiguous() for i, w in enumerate(weights)}, str(tmp))

    def _export_selected(self, pl_module: pl.LightningModule, run_dir: Path) -> None:
        """Write the chosen checkpoint's EMA weights as a diffusers folder ``selected/``; drop the other kept weights."""
        from safetensors.torch import load_file

        rule = self.config.selection
        chosen = rule.choose(self.points) if rule is not None else None
        folder = run_dir / _WEIGHTS
        path = folder / f"step{chosen['step']:08d}.safetensors" if chosen else None
        if chosen is None or not path.is_file():
            if chosen is not None:
                rank_zero_info(f"privdiff: the weights of the selected step {chosen['step']} are not on disk; no selected/ export")
            return
        saved = load_file(str(path))
        tmp = run_dir / f".{SELECTED}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with pl_module.ema_model() as model:
            params = list(model.trainable_parameters())
            backup = [p.detach().clone() for p in params]
            with torch.no_grad():
                for i, p in enumerate(params):
                    p.copy_(saved[str(i)].to(p.device, p.dtype))
            try:
                model.save_pretrained(tmp)
            finally:
                with torch.no_grad():
                    for p, b in zip(params, backup):
                        p.copy_(b)
        target = run_dir / SELECTED
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        write_json(target / "selected.json", {**chosen, "rule": asdict(rule)})
        for other in folder.glob("step*.safetensors"):
            if other != path:
                other.unlink()
        rank_zero_info(f"privdiff: exported the checkpoint of step {chosen['step']} to {target}: {chosen['reason']}")

    def trajectory_summary(self) -> dict[str, Any]:
        """The trajectory, the choice and the cost, as ``audit.json``'s ``trajectory`` keeps them."""
        rule = self.config.selection
        first = next((p["step"] for p in self.points if p.get("above_chance")), None)
        train = self.train_seconds if self._started is None else self._train_seconds_now()
        return {
            "every_n_steps": self.config.every_n_steps,
            "profile": {"num_samples": self.config.profile.num_samples, "steps": self.config.profile.steps,
                        "attacks": list((self.config.profile.attacks or {}).keys())},
            "points": self.points,
            "first_above_chance": first,
            "rule": asdict(rule) if rule is not None else None,
            "selected": rule.choose(self.points) if rule is not None else None,
            "stopped_early": bool(self.config.stop_after is not None and self._violations >= self.config.stop_after),
            "audit_seconds": self.audit_seconds,
            "train_seconds": train,
            # the training's wall time includes the audits: their share of it
            "audit_share": self.audit_seconds / train if train > 0 else None,
        }

    def _write(self, run_dir: Path, final: bool = False) -> None:
        write_json(run_dir / TRAJECTORY, {**self.trajectory_summary(), "final": final})
