"""The audit suite: sample, attack, measure, write ``audit.json``; as a Lightning callback and as a command.

After every ``privdiff fit`` the :class:`AuditCallback` audits the EMA weights; ``privdiff audit
--run DIR`` (or ``--model`` a diffusers folder with ``--manifest``) audits a saved model again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..defenses.base import DEFENSES_RECORD, Defense, DefenseRecord, DefenseStack, GenerationContext, Guarantee, as_stack
from ..train.data import ImageTable, Manifest, copies_per_member, image_fingerprint
from ..train.denoiser import Denoiser
from . import extraction, memorization, mia, quality
from .distances import calibrated_l2, nearest_two
from .sampling import generate
from .shard import Shard, check_shard

AUDIT_SCHEMA = "privdiff.audit/1"


@dataclass
class AuditConfig:
    """How big and how strong the audit is (``configs/audit/fast.yaml`` for tests, ``full.yaml`` for real use).

    Args:
        num_samples: images generated for extraction and memorization (Carlini et al. use 2^20 per model).
        solver, steps, batch_size: the sampler (``dpmsolver++`` at 20 steps by default).
        seed: seeds sampling and the attacks' noise.
        tau, min_clique, delta, tile_size: generate-and-filter extraction (Carlini et al. 2023 §4.2).
        calibrated_threshold, calibrated_n, calibrated_alpha: white-box calibrated-l2 check (§5.1).
        memorization_threshold: Gu et al. 2023's nearest/second-nearest ratio.
        mia_attacks: which membership-inference attacks run (``loss``, ``pia``, ``secmi``).
        mia_examples: members and as many held-out images scored (None: as many as both sets allow).
        loss_timesteps: timesteps scanned by the loss-threshold attack.
        pia_t, secmi_t, secmi_k: PIA's and SecMI's settings.
        fid_backbone: ``classifier`` (a small CNN trained on the data's labels, or on k-means clusters of
            unlabeled data; offline), ``inception``, or ``none``.
        fid_weights: the InceptionV3 weight file for ``inception`` (default: the torch hub cache's,
            downloaded when missing; hash-checked and loaded weights-only).
        fid_real: real images for FID: ``pool`` (all images of the source) or ``members``.
        max_cases: extracted cases kept (locally) for the report's grid.
    """

    num_samples: int = 512
    solver: str = "dpmsolver++"
    steps: int = 20
    batch_size: int = 256
    seed: int = 0
    tau: float = 0.15
    min_clique: int = 10
    delta: float = 0.15
    tile_size: int | None = None
    calibrated_threshold: float = 1.0
    calibrated_n: int = 50
    calibrated_alpha: float = 0.5
    memorization_threshold: float = 1 / 3
    mia_attacks: list[str] = field(default_factory=lambda: ["loss", "pia", "secmi"])
    mia_examples: int | None = None
    loss_timesteps: list[int] = field(default_factory=lambda: [10, 50, 100, 200, 300, 500])
    pia_t: int = 200
    secmi_t: int = 100
    secmi_k: int = 10
    fid_backbone: Literal["classifier", "inception", "none"] = "classifier"
    fid_weights: str | None = None
    fid_real: Literal["pool", "members"] = "pool"
    max_cases: int = 16
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.mia_attacks) - {"loss", "pia", "secmi"}
        if unknown:
            raise ValueError(f"unknown mia_attacks {sorted(unknown)}; choose from loss, pia, secmi")
        if self.num_samples < 1:
            raise ValueError(f"audit num_samples must be >= 1, got {self.num_samples}")


@dataclass
class AuditData:
    """What the audit compares the model with: unique members, held-out images, copies, the pool for FID."""

    members: ImageTable
    heldout: ImageTable
    copies: torch.Tensor
    pool: ImageTable | None = None
    manifest: Manifest | None = None


def _labels(table: ImageTable, denoiser: Denoiser) -> torch.Tensor | None:
    return table.labels.clamp(min=0) if denoiser.num_classes else None


def check_mia_sizes(num_members: int, num_heldout: int, config: AuditConfig) -> int:
    """Return how many members (and as many held-out images) membership inference scores.

    Raises ``ValueError`` naming the setting to change when fewer than 2 of either are available.
    """
    n = min(num_members, num_heldout)
    if config.mia_examples is not None:
        n = min(n, config.mia_examples)
    if n < 2:
        if num_heldout < 2:
            why = f"at least 2 held-out images, got data.num_heldout={num_heldout}; raise data.num_heldout"
        elif num_members < 2:
            why = f"at least 2 members, got {num_members}; raise data.num_members"
        else:
            why = f"at least 2 examples, got audit.mia_examples={config.mia_examples}; raise it"
        raise ValueError(f"membership inference needs {why} (or set audit.mia_attacks: [] to skip it)")
    return n


def run_mia(denoiser: Denoiser, data: AuditData, config: AuditConfig) -> dict[str, Any]:
    """Score members against an equal number of held-out non-members with each configured attack."""
    n = check_mia_sizes(len(data.members), len(data.heldout), config)
    members, heldout = data.members.select(range(n)), data.heldout.select(range(n))
    both = ImageTable.concat([members, heldout])
    x, y = both.model_scale().to(denoiser.device), _labels(both, denoiser)
    is_member = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    out: dict[str, Any] = {"num_members": n, "num_nonmembers": n}
    kw = {"batch_size": config.batch_size, "progress": config.progress}
    if "loss" in config.mia_attacks:
        res = mia.loss_threshold_attack(denoiser, x, is_member, y, timesteps=config.loss_timesteps, seed=config.seed, **kw)
        out["loss"] = {**res.best.to_dict(), "t": res.best_timestep, "per_timestep": {str(t): r.auc for t, r in res.per_timestep.items()}}
    if "pia" in config.mia_attacks:
        out["pia"] = {**mia.audit(mia.pia_scores(denoiser, x, y, t=config.pia_t, **kw), is_member).to_dict(), "t": config.pia_t}
    if "secmi" in config.mia_attacks:
        scores = mia.secmi_scores(denoiser, x, y, t_sec=config.secmi_t, k=config.secmi_k, **kw)
        out["secmi"] = {**mia.audit(scores, is_member).to_dict(), "t_sec": config.secmi_t, "k": config.secmi_k}
    attacks = [a for a in ("loss", "pia", "secmi") if a in out]
    if attacks:
        best = max(attacks, key=lambda a: out[a]["auc"])
        out["best"] = {"attack": best, **{k: out[best][k] for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")}}
    return out


def run_audit(
    denoiser: Denoiser,
    data: AuditData,
    config: AuditConfig,
    defenses: DefenseStack | None = None,
    run_dir: str | Path | None = None,
    feature_classifier: "quality.SmallClassifier | None" = None,
    shard: Shard | None = None,
    training: DefenseRecord | None = None,
) -> dict[str, Any]:
    """Run the whole suite and return the ``audit.json`` dict (also written into ``run_dir``).

    ``defenses`` are the run's defenses (their metrics and guarantees are reported, the
    generation-side ones act on the sampler); for a saved model, ``training`` is the record its
    training left (``defenses.json``), merged with the generation-side ``defenses`` given here.

    Extraction, memorization and MIA are computed against ``data.members`` (unique images, no
    planted copies) and ``data.heldout``; timings per stage are included so the slowest shows.

    With ``shard=(rank, world_size)`` every process of a ``torch.distributed`` group calls this
    with the same inputs: sampling, the extraction graph and the nearest-neighbour searches are
    split over the processes and gathered (the same numbers as one process for the same seeds);
    membership inference and FID run whole on every process; only rank 0 writes files.
    """
    shard = check_shard(shard)
    writes = shard is None or shard[0] == 0
    stack = as_stack(defenses)
    timings: dict[str, float] = {}
    members = data.members.unit()  # converted once: every distance below is on [0, 1] pixels
    reference = members.flatten(1)
    denoiser = denoiser.eval()

    start = time.perf_counter()
    generated = generate(
        denoiser,
        config.num_samples,
        solver=config.solver,
        steps=config.steps,
        batch_size=config.batch_size,
        defenses=stack,
        context=GenerationContext(reference=reference),
        seed=config.seed,
        progress=config.progress and writes,
        shard=shard,
    )
    samples = generated.images
    timings["sample"] = time.perf_counter() - start

    start = time.perf_counter()
    result: dict[str, Any] = {"extraction": {}}
    if len(samples):
        gf = extraction.generate_and_filter(
            samples, members, generated.labels, tau=config.tau, min_clique=config.min_clique,
            delta=config.delta, tile_size=config.tile_size, shard=shard,
        )
        cal = extraction.calibrated_extraction(
            samples, members, threshold=config.calibrated_threshold, n=config.calibrated_n,
            alpha=config.calibrated_alpha, shard=shard,
        )
    else:
        gf = cal = None
    extracted = sorted(set(gf.extracted_indices if gf else []) | set(cal.extracted_indices if cal else []))
    for name, res in (("generate_and_filter", gf), ("calibrated_l2", cal)):
        if res is not None:
            result["extraction"][name] = _extraction_summary(res, data.members)
    result["extraction"]["union"] = {
        "extracted": len(extracted),
        "fraction_of_members": len(extracted) / len(data.members),
        "ids": [data.members.ids[i] for i in extracted],
    }
    timings["extraction"] = time.perf_counter() - start

    start = time.perf_counter()
    if len(samples) and len(data.members) >= 2:
        mem = memorization.memorization_ratio(samples, members, threshold=config.memorization_threshold, shard=shard)
        result["memorization"] = _memorization_summary(mem)
    result["by_copies"] = {str(k): v for k, v in memorization.by_copies(extracted, data.copies).items()}
    result["threshold_check"] = threshold_check(data, config, shard=shard)
    timings["memorization"] = time.perf_counter() - start

    start = time.perf_counter()
    result["mia"] = run_mia(denoiser, data, config) if config.mia_attacks else {}
    timings["mia"] = time.perf_counter() - start

    start = time.perf_counter()
    if config.fid_backbone != "none" and len(samples) >= 2:
        real = data.pool if (config.fid_real == "pool" and data.pool is not None) else data.members
        if config.fid_backbone == "classifier" and feature_classifier is None:
            classes, source = quality.classes_for_features(real.unit(), real.labels, seed=config.seed)
            feature_classifier = quality.train_feature_classifier(real.unit(), classes, seed=config.seed, label_source=source)
        q = quality.compute_quality(
            real.unit(), samples, backbone=config.fid_backbone, classifier=feature_classifier, weights_path=config.fid_weights
        )
        result["quality"] = q.to_dict()
    timings["quality"] = time.perf_counter() - start

    record = stack.record() if training is None else training.merged(stack.record())
    result.update(
        schema=AUDIT_SCHEMA,
        run={"defenses": record.describe, "run_dir": str(run_dir) if run_dir else None},
        defense_metrics=dict(record.metrics),
        privacy=privacy_summary(record.guarantees, known=record.describe != UNKNOWN),
        data={
            "num_members": len(data.members),
            "num_heldout": len(data.heldout),
            "num_train_rows": int(data.copies.sum()),
            "planted_duplicates": len(data.manifest.planted_duplicates) if data.manifest else 0,
            "removed_by_dedup": len(data.manifest.removed) if data.manifest else 0,
        },
        sampling={
            "num_samples": len(samples),
            "num_drawn": generated.num_drawn,
            "num_rejected": generated.num_rejected,
            "reject_rate": generated.reject_rate,
            "solver": config.solver,
            "steps": config.steps,
        },
        config=asdict(config),
        timings_s=timings,
        training_images_embedded=False,
    )
    if run_dir is not None and writes:
        _save_cases(Path(run_dir), samples, data.members, gf, cal, config.max_cases)
        write_json(Path(run_dir) / "audit.json", result)
    return result


UNKNOWN = "unknown"


def privacy_summary(guarantees: Sequence[Guarantee], known: bool = True) -> dict[str, Any]:
    """The report's privacy entry from the defenses' formal guarantees.

    One guarantee is reported as it is; several (two DP mechanisms on the same data) compose by
    basic sequential composition (Dwork & Roth 2014, Thm. 3.16: epsilons and deltas add).
    ``known=False`` (a model audited without its training record) reports the guarantee as unknown.
    """
    if not known:
        return {"epsilon": None, "delta": None, "accountant": None, "holds": None, "known": False, "guarantees": []}
    if not guarantees:
        return {"epsilon": None, "delta": None, "accountant": None, "holds": None, "known": True, "guarantees": []}
    first = guarantees[0]
    several = len(guarantees) > 1
    return {
        "epsilon": sum(g.epsilon for g in guarantees),
        "delta": sum(g.delta for g in guarantees),
        "accountant": "basic composition of " + ", ".join(f"{g.defense} ({g.accountant})" for g in guarantees) if several else first.accountant,
        "holds": all(g.holds for g in guarantees),
        "known": True,
        "guarantees": [g.to_dict() for g in guarantees],
    }


def threshold_check(data: AuditData, config: AuditConfig, shard: Shard | None = None) -> dict[str, Any]:
    """How often each criterion flags held-out *real* images, which no model copied (a false-positive rate).

    The published thresholds were set for CIFAR-10 and 50k training images; on a small member set
    of simple images a novel image can sit close to a member. A rate above 1% means the criterion
    would call honest samples "extracted": lower the threshold in the audit config.
    """
    if len(data.heldout) == 0 or len(data.members) < 2:
        return {}
    held, ref = data.heldout.unit(), data.members.unit()
    d1, d2, _ = nearest_two(held, ref, shard=shard)
    rates = {
        "l2_le_delta": float((d1 <= config.delta).float().mean()),
        "calibrated_below_threshold": float(
            (calibrated_l2(held, ref, n=config.calibrated_n, alpha=config.calibrated_alpha, shard=shard).score < config.calibrated_threshold).float().mean()
        ),
        "nn_ratio_below_threshold": float(((d1 / d2.clamp(min=1e-12)) < config.memorization_threshold).float().mean()),
    }
    too_loose = [k for k, v in rates.items() if v > 0.01]
    if too_loose:
        rank_zero_warn(
            f"audit thresholds flag real held-out images as copies ({', '.join(f'{k}={rates[k]:.1%}' for k in too_loose)}); "
            "lower delta / calibrated_threshold / memorization_threshold for this data"
        )
    return {"heldout_flag_rate": rates, "num_heldout": len(held), "ok": not too_loose}


def _extraction_summary(res: "extraction.ExtractionResult", members: ImageTable) -> dict[str, Any]:
    ids = res.extracted_indices
    return {
        "extracted": len(ids),
        "fraction_of_members": len(ids) / len(members),
        "num_samples_flagged": res.num_samples_flagged,
        "records": [
            {"id": members.ids[r.train_index], "sample": r.sample_index, "distance": r.distance}
            for r in sorted(res.records, key=lambda r: r.distance)
        ],
        "params": res.params,
    }


def _memorization_summary(mem: Any) -> dict[str, Any]:
    return mem.to_dict()


def _save_cases(run_dir: Path, samples, members: ImageTable, gf, cal, max_cases: int) -> None:
    """Keep the closest extracted pairs on local disk (safetensors) for the report's grid."""
    from safetensors.torch import save_file

    records = [r for res in (gf, cal) if res is not None for r in res.records]
    best: dict[int, Any] = {}
    for r in sorted(records, key=lambda r: r.distance):
        best.setdefault(r.train_index, r)
    chosen = list(best.values())[:max_cases]
    shape = (0, *members.image_shape)
    tensors = {
        "samples": torch.stack([samples[r.sample_index] for r in chosen]) if chosen else torch.empty(shape),
        "nearest": members.unit()[[r.train_index for r in chosen]] if chosen else torch.empty(shape),
        "distance": torch.tensor([float(r.distance) for r in chosen]),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(run_dir / "audit_cases.safetensors"))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def report_single_run(run_dir: Path, result: dict[str, Any]) -> None:
    """Write the one-row report of a run into its directory and print its table."""
    from .report import markdown_table, summarize, write_report

    write_report(run_dir, {run_dir.name: result}, {run_dir.name: run_dir}, title=f"privdiff audit: {run_dir.name}")
    print(markdown_table([summarize(run_dir.name, result)]))


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The audit's headline numbers as ``audit/...`` scalars for the loggers."""
    out: dict[str, float] = {}
    union = result.get("extraction", {}).get("union", {})
    out["audit/extracted"] = float(union.get("extracted", 0))
    out["audit/extracted_fraction"] = float(union.get("fraction_of_members", 0.0))
    if "memorization" in result:
        out["audit/nn_ratio_memorized"] = float(result["memorization"]["fraction_memorized"])
    for attack in ("loss", "pia", "secmi"):
        if attack in result.get("mia", {}):
            out[f"audit/mia_{attack}_auc"] = float(result["mia"][attack]["auc"])
            out[f"audit/mia_{attack}_tpr_at_1pct_fpr"] = float(result["mia"][attack]["tpr_at_1pct_fpr"])
    if "quality" in result:
        out[f"audit/fid_{result['quality']['backbone']}"] = float(result["quality"]["fid"])
    out["audit/reject_rate"] = float(result["sampling"]["reject_rate"])
    return out


# ---------------------------------------------------------------------------------------------
# After fit: the callback
# ---------------------------------------------------------------------------------------------
class AuditCallback(pl.Callback):
    """Runs the audit on the EMA weights when ``fit`` ends and logs it; writes ``audit.json`` and the report."""

    def __init__(self, config: AuditConfig | None = None, log_training_images: bool = False) -> None:
        self.config = config or AuditConfig()
        self.log_training_images = log_training_images
        self.result: dict[str, Any] | None = None
        self._train_start: float | None = None
        self._train_time: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After the data module's setup, before any training step: refuse an audit that cannot run.
        dm = trainer.datamodule
        if self.config.mia_attacks and getattr(dm, "heldout", None) is not None and getattr(dm, "members", None) is not None:
            check_mia_sizes(len(dm.members), len(dm.heldout), self.config)
        if self.config.fid_backbone == "inception":
            quality.load_feature_extractor("inception", weights_path=self.config.fid_weights)  # its weights: now, not after training

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._train_start is not None:
            self._train_time = time.perf_counter() - self._train_start

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Under DDP every process samples and searches its share (the EMA weights are the same on
        # every rank); rank 0 alone writes and logs. Without a process group, rank 0 audits alone.
        distributed = trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        if not (trainer.is_global_zero or distributed):
            return
        shard = (trainer.global_rank, trainer.world_size) if distributed else None
        dm = trainer.datamodule
        run_dir = Path(trainer.default_root_dir)
        data = AuditData(
            members=dm.members, heldout=dm.heldout, copies=copies_per_member(dm.manifest, dm.members),
            pool=getattr(dm, "pool", None), manifest=dm.manifest,
        )
        rank_zero_info(
            f"privdiff: auditing the EMA model ({self.config.num_samples} samples"
            + (f", sampling and neighbour search over {trainer.world_size} processes" if shard else "") + ") ..."
        )
        # Lightning's teardown has moved the module to the CPU before on_fit_end: audit on the training device.
        denoiser = pl_module.ema_denoiser().to(trainer.strategy.root_device)
        result = run_audit(denoiser, data, self.config, pl_module.defenses, run_dir, shard=shard)
        if not trainer.is_global_zero:
            return
        result["run"]["train_time_s"] = self._train_time
        result["run"]["steps"] = trainer.global_step
        write_json(run_dir / "audit.json", result)
        for logger in trainer.loggers:
            logger.log_metrics(flat_metrics(result), step=trainer.global_step)
            if self.log_training_images and hasattr(logger, "log_image"):
                self._log_cases(logger, run_dir, trainer.global_step)
            logger.save()
        report_single_run(run_dir, result)
        self.result = result


    @staticmethod
    def _log_cases(logger: Any, run_dir: Path, step: int) -> None:
        """Send the extracted cases (training images!) to a dashboard; only on the user's explicit opt-in."""
        from .report import cases_figure, load_cases

        cases = load_cases(run_dir)
        if cases is None or not len(cases["samples"]):
            return
        import matplotlib.pyplot as plt

        fig = cases_figure(cases)
        fig.canvas.draw()
        image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        logger.log_image(key="audit/extracted_cases", images=[image], step=step)


# ---------------------------------------------------------------------------------------------
# `privdiff audit`: again, on a saved model
# ---------------------------------------------------------------------------------------------
def load_audit_data(manifest: Manifest) -> AuditData:
    """Rebuild members, held-out images and the pool from the manifest's recorded data settings."""
    from ..train.data import DiffusionDataModule

    source = {k: v for k, v in manifest.source.items() if k != "defenses"}
    dm = DiffusionDataModule(**source)
    pool = dm.load_pool()
    index = {image_id: row for row, image_id in enumerate(pool.ids)}
    missing = [i for i in manifest.members + manifest.heldout if i not in index]
    if missing:
        raise ValueError(
            f"the manifest names {len(missing)} image(s) the data source does not have (e.g. {missing[:3]}); "
            "the manifest does not match the data"
        )
    members = pool.select([index[i] for i in manifest.members])
    heldout = pool.select([index[i] for i in manifest.heldout])
    manifest.check_fingerprint(image_fingerprint(members, heldout), "the data source")
    return AuditData(members, heldout, copies_per_member(manifest, members), pool, manifest)


def audit_saved(
    run: str | None = None,
    model: str | None = None,
    manifest: str | None = None,
    audit: AuditConfig | None = None,
    out: str | None = None,
    defenses: list[Defense] | None = None,
) -> dict[str, Any]:
    """Audit a saved model again: ``--run DIR``, or ``--model DIR --manifest FILE``.

    The defenses the model was trained with, and what they guarantee (epsilon), are read from the
    ``defenses.json`` that ``privdiff fit`` left beside the manifest; without it they are reported
    as unknown, never as "none".

    Args:
        run: a run directory written by ``privdiff fit`` (holds model/, manifest.json, defenses.json).
        model: a diffusers model folder (instead of ``run``); needs ``manifest``.
        manifest: the manifest.json of the run that trained ``model`` (members and held-out images).
        audit: the audit's settings (``-c configs/audit/full.yaml``, ``--audit.num_samples ...``).
        out: where audit.json and the report go; default a new folder audits/<UTC time> in the
            run directory (or beside the manifest), so the run's own audit.json is never overwritten.
        defenses: generation-side defenses to add to the sampler (e.g. an output filter).
    """
    if (run is None) == (model is None):
        raise ValueError("give exactly one of --run DIR or --model DIR (with --manifest FILE); see `privdiff audit --help`")
    if run is not None:
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory {run_dir} does not exist (written by `privdiff fit --run_dir DIR`)")
        model_dir, manifest_path = run_dir / "model", run_dir / "manifest.json"
        if not model_dir.is_dir():
            raise FileNotFoundError(
                f"{run_dir} holds no model/ folder: its training did not finish (resume it with `privdiff fit ... "
                "--ckpt_path last`), or it is not a privdiff run directory"
            )
    else:
        model_dir = Path(model)
        if manifest is None:
            raise ValueError("--model needs --manifest (the manifest.json written by `privdiff fit`)")
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model folder {model_dir} does not exist")
        manifest_path = Path(manifest)
        run_dir = manifest_path.parent
    out_dir = Path(out) if out else run_dir / "audits" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    denoiser = Denoiser.from_pretrained(model_dir)
    loaded = Manifest.load(manifest_path)
    if list(denoiser.image_shape) != list(loaded.image_shape):
        raise ValueError(f"model images are {denoiser.image_shape} but the manifest's data are {tuple(loaded.image_shape)}")
    record_path = manifest_path.parent / DEFENSES_RECORD
    if record_path.is_file():
        training = DefenseRecord.load(record_path)
    else:
        rank_zero_warn(f"no {DEFENSES_RECORD} beside {manifest_path}: the model's training defenses and guarantees are reported as unknown")
        training = DefenseRecord(describe=UNKNOWN)
    data = load_audit_data(loaded)
    result = run_audit(denoiser, data, audit or AuditConfig(), as_stack(defenses), out_dir, training=training)
    report_single_run(out_dir, result)
    print(f"privdiff audit: wrote {out_dir / 'audit.json'} and {out_dir / 'report.html'}")
    return result
