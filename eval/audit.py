"""The audit: sample once, run the configured attacks and metrics, write ``audit.json``; as a Lightning callback and as a command.

After every ``privdiff fit`` the :class:`AuditCallback` audits the EMA weights; ``privdiff audit
--run DIR`` (or ``--model`` a diffusers folder with ``--manifest``) audits a saved model again.
What runs is the list ``audit.attacks`` (``eval.plugin.AuditPlugin`` classes by ``class_path``);
this module knows none of them by name.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from privdiff.classpath import class_from_path
from privdiff.files import write_json_atomic
from privdiff.membership import Manifest, copies_per_member, image_fingerprint
from privdiff.model import DiffusionModel, GenerativeModel
from privdiff.shard import Shard, check_shard

from ..defenses.base import DEFENSES_RECORD, Defense, DefenseRecord, DefenseStack, GenerationContext, Guarantee, as_stack
from .plugin import AuditContext, AuditData, AuditPlugin, AuditResult, Cases
from .sample_stream import KeepAll, digest, remove_shards, stream_samples
from .sampling import Generated, generate, member_prompts, saturation_sanity, solver_sanity
from .signals import CopyCriteria, compute_signal, copy_thresholds, signal_order
from .thresholds import split_heldout

AUDIT_SCHEMA = "privdiff.audit/3"  # 3: controls beside every count, decoded comparison, threshold status
FLAG_RATE_LIMIT = 0.01  # a criterion that flags more real held-out images than this is too loose for the data
UNKNOWN = "unknown"
CALIBRATION_SHARE = 0.5  # of the held-out images, set aside to take thresholds from
SHARD_FOLDER = "audit_shards"  # in the run directory: the finished shards of an audit under way (removed when it ends)

__all__ = ["AuditCallback", "AuditConfig", "AuditData", "audit_saved", "default_attacks", "privacy_summary", "run_audit"]


def default_attacks() -> dict[str, dict[str, Any]]:
    """Today's suite, in report-column order: FID/KID, extraction, NN-ratio memorization, membership inference."""
    return {
        "quality": {"class_path": "privdiff.eval.quality.SampleQuality"},
        "extraction": {"class_path": "privdiff.eval.extraction.ExtractionAttack"},
        "memorization": {"class_path": "privdiff.eval.memorization.NNRatioMemorization"},
        "mia": {"class_path": "privdiff.eval.mia.MembershipInference"},
    }


def _instantiate(spec: Any) -> AuditPlugin:
    """A plugin from itself or from a ``{class_path, init_args}`` dict (a config written by hand in Python)."""
    if isinstance(spec, AuditPlugin):
        return spec
    if isinstance(spec, dict) and "class_path" in spec:
        cls = class_from_path(spec["class_path"])
        if not issubclass(cls, AuditPlugin):
            raise ValueError(f"audit attack {spec['class_path']} is not a privdiff.eval.plugin.AuditPlugin")
        return cls(**dict(spec.get("init_args") or {}))
    raise ValueError(f"an audit attack must be a class_path + init_args entry, got {spec!r}")


@dataclass
class AuditConfig:
    """How big the audit is and what it runs (``configs/audit/fast.yaml`` for tests, ``full.yaml`` for real use).

    Args:
        num_samples: images generated once and shared by every attack (Carlini et al. use 2^20 per model).
        solver, steps, batch_size: the sampler: ``ancestral`` (DDIM with eta = 1) at 50 steps by
            default, whose samples match 1000-step DDPM samples of the same weights, trained or
            under-trained (``scripts/bench_sampling.py``); ``ddim`` (deterministic) and
            ``dpmsolver++`` did not on a DP-SGD model, and DPM-Solver++ saturates pixels.
        shard_size: samples drawn and reduced at a time (:mod:`privdiff.eval.sample_stream`): the audit's memory
            grows with this, not with ``num_samples``; with a run directory, each finished shard is saved there, and a
            killed audit resumes from them.
        seed: seeds sampling, the attacks' noise and the split of the held-out images into calibration
            images (half: thresholds are taken from them) and evaluation images (the rest).
        flag_rate: the share of real held-out images a threshold taken from the data may flag
            (each attack's own ``flag_rate`` overrides it).
        progress: progress bars.
        attacks: the attacks and metrics, by name: ``class_path`` + ``init_args`` of
            ``privdiff.eval.plugin.AuditPlugin`` classes, run in this order (default
            :func:`default_attacks`). A YAML list replaces the whole default; ``--audit.attacks.NAME.ARG``
            changes one setting.
        skip: names of ``attacks`` left out of this audit (``--audit.skip '[mia, detection]'``: the command
            line cannot set one entry of ``attacks`` to null).
    """

    num_samples: int = 512
    solver: str = "ancestral"
    steps: int = 50
    batch_size: int = 256
    shard_size: int = 4096
    seed: int = 0
    flag_rate: float = 0.01
    progress: bool = True
    attacks: dict[str, AuditPlugin | None] = field(default_factory=default_attacks)
    skip: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.skip) - set(self.attacks or {}))
        if unknown:
            raise ValueError(f"audit skip names {unknown}, which audit.attacks does not list; its attacks: {sorted(self.attacks or {})}")
        if self.attacks and not any(spec is not None and name not in self.skip for name, spec in self.attacks.items()):
            # A YAML dict replaces the default one: `attacks: {mia: null}` leaves nothing, not "all but mia".
            raise ValueError(
                f"audit.attacks leaves no attack to run ({sorted(self.attacks)} all null or skipped). To leave some "
                "out, use audit.skip: [NAME, ...] (a dict under audit.attacks replaces the default list); for no audit, audit: null"
            )
        if self.num_samples < 1:
            raise ValueError(f"audit num_samples must be >= 1, got {self.num_samples}")
        if self.shard_size < 1:
            raise ValueError(f"audit shard_size must be >= 1, got {self.shard_size}")
        if not 0 < self.flag_rate < 1:
            raise ValueError(f"audit flag_rate must be in (0, 1), got {self.flag_rate}")

    def plugins(self) -> list[tuple[str, AuditPlugin]]:
        """The configured plugins, instantiated, in order (``None`` entries and the skipped ones dropped)."""
        return [(name, _instantiate(spec)) for name, spec in (self.attacks or {}).items() if spec is not None and name not in self.skip]

    def to_dict(self) -> dict[str, Any]:
        plain = {k: getattr(self, k) for k in ("num_samples", "solver", "steps", "batch_size", "shard_size", "seed", "flag_rate",
                                             "progress")}
        return {**plain, "attacks": {name: plugin.config() for name, plugin in self.plugins()}}

    def check(self, num_members: int, num_heldout: int) -> None:
        """Raise ``ValueError`` (before training) when a configured plugin cannot run on data of these sizes.

        Plugins see the held-out images that remain after the calibration half is set aside.
        """
        for _, plugin in self.plugins():
            signal_order(set(plugin.needs))  # a need no signal computes is an error now, not after training
            plugin.check(num_members, num_heldout - int(round(num_heldout * CALIBRATION_SHARE)))
            plugin.check_sampler(self.steps)


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------
def run_audit(
    model: GenerativeModel,
    data: AuditData,
    config: AuditConfig,
    defenses: DefenseStack | Sequence[Defense] | None = None,
    run_dir: str | Path | None = None,
    shard: Shard | None = None,
    training: DefenseRecord | None = None,
) -> dict[str, Any]:
    """Sample once, run every configured plugin, and return the ``audit.json`` dict (also written into ``run_dir``).

    Attacks are computed against ``data.members`` (unique images, no planted copies) and
    ``data.heldout``. ``defenses`` are the run's defenses: their metrics and guarantees are
    reported, and the generation-side ones act on the sampler. For a saved model, ``training`` is
    the record its training left (``defenses.json``), merged with the ``defenses`` given here.
    Timings per stage are included so the slowest shows.

    With ``shard=(rank, world_size)`` every process of a ``torch.distributed`` group calls this
    with the same inputs: sampling and the nearest-neighbour searches are split over the
    processes and gathered (the same numbers as one process for the same seeds); only rank 0
    writes files.
    """
    shard = check_shard(shard)
    writes = shard is None or shard[0] == 0
    stack = as_stack(defenses)
    plugins = config.plugins()
    model = model.eval()
    timings: dict[str, float] = {}

    if data.calibration is not None:
        calibration, heldout = data.calibration, data.heldout
    else:
        cal_rows, eval_rows = split_heldout(len(data.heldout), config.seed, CALIBRATION_SHARE)
        calibration, heldout = data.heldout.select(cal_rows), data.heldout.select(eval_rows)
    reference = data.members.unit().flatten(1)
    generation = GenerationContext(reference=reference, public_prompts=calibration.captions)
    record = stack.record() if training is None else training.merged(stack.record())

    def sampler(prompts: Sequence[str], seed: int, steps: int | None = None):
        # More samples for an attack that picks its own prompts, through the same sampler and defenses.
        return generate(model, len(prompts), solver=config.solver, steps=steps or config.steps, batch_size=config.batch_size,
                        prompts=list(prompts), defenses=stack, context=generation,
                        seed=seed, progress=False, shard=shard)

    context = AuditContext(model, data, torch.empty(0, *data.members.image_shape), None, seed=config.seed,
                           batch_size=config.batch_size, progress=config.progress and writes, shard=shard,
                           calibration=calibration, heldout=heldout, flag_rate=config.flag_rate, steps=config.steps,
                           sampler=sampler if model.conditioning == "text" else None, evidence=record.evidence,
                           claimed=privacy_summary(record.guarantees, known=record.describe != UNKNOWN))

    # The copy criteria are the configured extraction attack's (a user's delta reaches every plugin that flags copies);
    # duck-typed by its ``criteria`` method so that the runner names no attack. Without one: the default criteria.
    provider = next((p for _, p in plugins if callable(getattr(p, "criteria", None))), None)
    criteria = provider.criteria() if provider is not None else CopyCriteria()
    context.copy_thresholds = lambda space="pixel": copy_thresholds(context, criteria, space)

    folder = Path(run_dir) / SHARD_FOLDER if run_dir is not None else None
    computed: set[str] = set()
    sampling = _stream(model, data, config, stack, generation, plugins, context, computed, timings, folder, record, shard, writes)

    result: dict[str, Any] = {"schema": AUDIT_SCHEMA}
    results = _run_plugins(plugins, context, timings, computed)
    result.update({name: found.to_dict() for name, found in results.items()})

    result.update(
        plugins={
            name: {"class_path": plugin.config()["class_path"], "columns": [c.to_dict() for c in results[name].columns()],
                   "notes": results[name].notes(), "verdict": results[name].verdict()}
            for name, plugin in plugins if name in results
        },
        scalars={f"audit/{k}": v for r in results.values() for k, v in r.scalars().items()},
        threshold_check=threshold_check(results, len(heldout)),
        run={"defenses": record.describe, "run_dir": str(run_dir) if run_dir else None},
        defense_metrics=dict(record.metrics),
        privacy=privacy_summary(record.guarantees, known=record.describe != UNKNOWN),
        data={
            "num_members": len(data.members),
            "num_member_groups": len(set(data.group_of().tolist())),
            "num_heldout": len(data.heldout),
            "num_calibration": len(calibration),
            "num_evaluation": len(heldout),
            "num_train_rows": int(data.copies.sum()),
            "planted_duplicates": len(data.manifest.planted_duplicates) if data.manifest else 0,
            "removed_by_defenses": len(data.manifest.removed) if data.manifest else 0,
        },
        sampling={**sampling, "solver": config.solver, "steps": config.steps},
        config=config.to_dict(),
        model=model.summary(),
        environment=environment(config.seed),
        timings_s=timings,
        training_images_embedded=False,
    )
    if run_dir is not None and writes:
        _save_cases(Path(run_dir), [c for r in results.values() if (c := r.cases()) is not None], data.members.image_shape)
        write_json(Path(run_dir) / "audit.json", result)
        remove_shards(Path(run_dir) / SHARD_FOLDER)
    return result


def _stream(model: GenerativeModel, data: AuditData, config: AuditConfig, stack: DefenseStack, generation: GenerationContext,
            plugins: list[tuple[str, AuditPlugin]], context: AuditContext, computed: set[str], timings: dict[str, float],
            folder: Path | None, record: DefenseRecord, shard: Shard | None, writes: bool) -> dict[str, Any]:
    """Draw the audit's samples in shards through the generation-side defenses and every plugin's reduction
    (:mod:`privdiff.eval.sample_stream`); put what the plugins kept into ``context`` and return the sampling record.

    The signals a plugin that reads samples needs are computed first (its reduction may read them: the copy
    thresholds); their time and its reduction's count to that plugin, the drawing to ``sample``.
    """
    timings["sample"] = 0.0  # first: the report's time breakdown lists sampling before the attacks
    readers = [(name, plugin) for name, plugin in plugins if plugin.needs_samples]
    if not readers:
        return {"num_samples": 0, "num_drawn": 0, "num_rejected": 0, "reject_rate": 0.0}
    prompts = None
    if model.conditioning == "text":
        if data.members.captions is None:
            raise ValueError("a text-to-image model is audited with its members' captions, and the members have none")
        prompts = member_prompts(data.members.captions, config.num_samples)
    reductions = {}
    for name, plugin in readers:
        start = time.perf_counter()
        for signal in signal_order(set(plugin.needs) - computed):
            compute_signal(signal, context)
            computed.add(signal)
        own = type(plugin).reduction is not AuditPlugin.reduction
        reduction = plugin.reduction(context) if own else KeepAll()
        if reduction is not None:
            reductions[name] = reduction
        timings[name] = time.perf_counter() - start
    number = {p: i for i, p in enumerate(dict.fromkeys(prompts))} if prompts is not None else None

    def draw(k: int, first: int, count: int) -> Generated:
        part = prompts[first : first + count] if prompts is not None else None
        generated = generate(model, count, solver=config.solver, steps=config.steps, batch_size=config.batch_size,
                             prompts=part, defenses=stack, context=generation, seed=config.seed, progress=False,
                             shard=shard, stream=k)
        if part is not None and generated.labels is not None:  # the shard numbers its own prompts: number them as one audit
            generated.labels = torch.tensor([number[p] for p in dict.fromkeys(part)])[generated.labels]
        return generated

    settings = {k: v for k, v in config.to_dict().items() if k != "progress"}
    fingerprint = digest(settings, data.members.ids, context.calibration.ids if context.calibration
                         else None, context.heldout.ids if context.heldout else None, record.describe,
                         model=model) if folder is not None else ""
    streamed = stream_samples(draw, config.num_samples, config.shard_size, reductions, folder=folder, fingerprint=fingerprint,
                              writes=writes, progress=config.progress and writes, shard=shard)
    for name, plugin in readers:
        if name not in reductions:
            continue
        timings[name] += streamed.seconds[name]
        if isinstance(reductions[name], KeepAll):
            context.samples, context.sample_labels = streamed.reduced[name]
        else:
            context.reductions[id(plugin)] = streamed.reduced[name]
    context.sample_count = streamed.num_samples
    timings["sample"] = streamed.seconds["sample"]
    sampling = {"num_samples": streamed.num_samples, "num_drawn": streamed.num_drawn, "num_rejected": streamed.num_rejected,
                "reject_rate": streamed.num_rejected / streamed.num_drawn if streamed.num_drawn else 0.0,
                "sanity": saturation_sanity(streamed.saturated, context.members),
                "shard_size": config.shard_size, "resumed_shards": streamed.resumed_shards}
    if not sampling["sanity"]["ok"] and not model.has_noise_predictor:
        # one sampler, no solver to change: the saturation is the model's
        sampling["solver_check"] = {"not_applicable": "the model has no solver to change", "model_saturated": True}
        rank_zero_warn("the model's samples are saturated (it has no solver to change): extractions and FID are suspect")
    elif not sampling["sanity"]["ok"]:
        sampling["solver_check"] = check_solvers(model, config, sampling["sanity"], context.members, prompts)
    return sampling


def _run_plugins(plugins: list[tuple[str, AuditPlugin]], context: AuditContext, timings: dict[str, float],
                 computed: set[str]) -> dict[str, AuditResult]:
    """Every plugin in order, each after the audit signals it declares (``AuditPlugin.needs``) that no plugin before it
    needed (``computed`` holds those already computed): a signal is computed once, and its time counts to the first
    plugin that reads it, with that plugin's sample reduction (``timings`` holds it)."""
    results: dict[str, AuditResult] = {}
    for name, plugin in plugins:
        start = time.perf_counter()
        for signal in signal_order(set(plugin.needs) - computed):
            compute_signal(signal, context)
            computed.add(signal)
        found = plugin.run(context)
        if found is None:  # nothing to measure (e.g. no canaries in this run): no column, no timing
            timings.pop(name, None)
            continue
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        results[name] = found
    return results


SANITY_SOLVERS = ("ancestral", "ddim", "dpmsolver++")
SANITY_SAMPLES = 32


def check_solvers(model: DiffusionModel, config: AuditConfig, sanity: dict[str, Any], real: torch.Tensor,
                  prompts: Sequence[str] | None) -> dict[str, Any]:
    """Where the audit's samples are saturated, the other solvers on the same weights: the solver's fault or the model's.

    Returns each solver's sanity, ``model_saturated`` (every solver saturates) and ``sane`` (the solvers that do
    not), and warns with the right advice.
    """
    others = [s for s in SANITY_SOLVERS if s != config.solver]
    checked = {config.solver: sanity, **solver_sanity(model, others, real, num_samples=SANITY_SAMPLES, steps=config.steps,
                                                      prompts=prompts, seed=config.seed)}
    sane = [s for s, v in checked.items() if v["ok"]]
    shares = ", ".join(f"{s} {v['saturated_low']:.0%} / {v['saturated_high']:.0%}" for s, v in checked.items())
    measured = (f"pixels at 0 / at 1: {shares}, against {sanity['real_saturated_low']:.0%} / {sanity['real_saturated_high']:.0%} "
                "in the members")
    if sane:
        rank_zero_warn(f"the audit's samples are saturated with {config.solver} ({config.steps} steps) but not with "
                       f"{', '.join(sane)} on the same weights ({measured}): the solver does not fit this model; extractions "
                       f"and FID are suspect. Set audit.solver: {sane[0]}")
    else:
        rank_zero_warn(f"the model's samples are saturated: every solver gives saturated samples on these weights ({measured}), "
                       "so the solver is not the cause; extractions and FID are suspect. Train longer or check the data and "
                       "the model (a text-to-image model's VAE, its guidance scale)")
    return {"solvers": checked, "sane": sane, "model_saturated": not sane}


def environment(seed: int) -> dict[str, Any]:
    """What reproduces this audit: the seed, the versions of the packages that compute it, privdiff's git commit."""
    import importlib.metadata
    import subprocess

    import privdiff

    versions = {}
    for package in ("privdiff", "torch", "diffusers", "opacus", "lightning", "torchmetrics", "numpy", "scipy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    checkout = Path(privdiff.__file__).resolve().parent.parent
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
        if commit:
            status = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
            dirty = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # not a checkout, or no git: the versions say what ran
    return {"seed": seed, "versions": versions, "git_commit": commit, "git_dirty": dirty}


def threshold_check(results: dict[str, AuditResult], num_heldout: int, limit: float = FLAG_RATE_LIMIT) -> dict[str, Any]:
    """How often each criterion flags held-out *real* images, which no model copied (a false-positive rate).

    Measured on the evaluation held-out images (not those thresholds were calibrated on), with its exact 95%
    interval. Each criterion's ``status`` is ``within`` (the interval lies at or below ``limit``), ``above`` (beyond
    it: too loose for the data; a warning says so) or ``unresolved`` (the interval holds both: 0 of 40 flagged
    cannot show <= 1%; ``needed`` held-out images flagging none could). ``ok`` only when every criterion is within.
    """
    from .thresholds import heldout_needed, rate_status

    rates = {k: v for r in results.values() for k, v in r.heldout_flag_rates().items()}
    if not rates:
        return {}
    status = {k: rate_status(round(v * num_heldout), num_heldout, limit) for k, v in rates.items()}
    too_loose = [k for k, v in status.items() if v == "above"]
    unresolved = [k for k, v in status.items() if v == "unresolved"]
    if too_loose:
        rank_zero_warn(
            f"audit thresholds flag real held-out images as copies ({', '.join(f'{k}={rates[k]:.1%}' for k in too_loose)}); "
            "leave the thresholds of audit.attacks to the data (null) or lower them"
        )
    return {"heldout_flag_rate": rates, "num_heldout": num_heldout, "limit": limit, "status": status, "too_loose": too_loose,
            "unresolved": unresolved, "needed": heldout_needed(limit), "ok": not too_loose and not unresolved}


def privacy_summary(guarantees: Sequence[Guarantee], known: bool = True) -> dict[str, Any]:
    """The report's privacy entry from the defenses' formal guarantees.

    One guarantee is reported as it is; several (two DP mechanisms on the same data) compose by
    basic sequential composition (Dwork & Roth 2014, Thm. 3.16: epsilons and deltas add).
    ``known=False`` (a model audited without its training record) reports the guarantee as unknown.
    """
    empty = {"epsilon": None, "delta": None, "accountant": None, "holds": None, "known": known, "guarantees": []}
    if not known or not guarantees:
        return empty
    several = len(guarantees) > 1
    return {
        "epsilon": sum(g.epsilon for g in guarantees),
        "delta": sum(g.delta for g in guarantees),
        "accountant": "basic composition of " + ", ".join(f"{g.defense} ({g.accountant})" for g in guarantees)
        if several else guarantees[0].accountant,
        "holds": all(g.holds for g in guarantees),
        "known": True,
        "guarantees": [g.to_dict() for g in guarantees],
    }


def _save_cases(run_dir: Path, cases: list[Cases], image_shape: Sequence[int]) -> None:
    """Keep the plugins' cases (samples next to the member they copy) on local disk, safetensors, for the report."""
    from safetensors.torch import save_file

    shape = (0, *image_shape)
    tensors = {
        "samples": torch.cat([c.samples for c in cases]) if cases else torch.empty(shape),
        "nearest": torch.cat([c.nearest for c in cases]) if cases else torch.empty(shape),
        "distance": torch.cat([c.distance for c in cases]) if cases else torch.empty(0),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {key: json.dumps([v for c in cases for v in getattr(c, key)]) for key in ("member_ids", "flagged_by", "copies")}
    if any(c.captions for c in cases):  # one caption per pair, or "" where a plugin gave none
        meta["captions"] = json.dumps([v for c in cases for v in (c.captions or [""] * len(c.samples))])
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(run_dir / "audit_cases.safetensors"), metadata=meta)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically."""
    write_json_atomic(path, data, default=float)


def report_single_run(run_dir: Path, result: dict[str, Any]) -> None:
    """Write the one-row report of a run into its directory and print its table."""
    from .report import markdown_table, summarize, write_report

    write_report(run_dir, {run_dir.name: result}, {run_dir.name: run_dir}, title=f"privdiff audit: {run_dir.name}")
    print(markdown_table([summarize(run_dir.name, result)]))


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The audit's headline numbers as ``audit/...`` scalars for the loggers."""
    return {**{k: float(v) for k, v in result.get("scalars", {}).items()}, "audit/reject_rate": float(result["sampling"]["reject_rate"])}


# ---------------------------------------------------------------------------------------------
# After fit: the callback
# ---------------------------------------------------------------------------------------------
class AuditCallback(pl.Callback):
    """Runs the audit on the EMA weights when ``fit`` ends and logs it; writes ``audit.json`` and the report.

    It reads the data module's ``members``, ``heldout``, ``manifest`` and ``pool`` and the module's
    ``ema_model()`` and ``defenses``: nothing else of the training stage.
    """

    def __init__(self, config: AuditConfig | None = None, log_training_images: bool = False) -> None:
        self.config = config or AuditConfig()
        self.log_training_images = log_training_images
        self.result: dict[str, Any] | None = None
        self._train_start: float | None = None
        self._train_time: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After the data module's setup, before any training step: refuse an audit that cannot run.
        dm = trainer.datamodule
        if getattr(dm, "heldout", None) is not None and getattr(dm, "members", None) is not None:
            self.config.check(len(dm.members), len(dm.heldout))

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
        data = datamodule_audit_data(dm)
        rank_zero_info(
            f"privdiff: auditing the EMA model ({self.config.num_samples} samples"
            + (f", sampling and neighbour search over {trainer.world_size} processes" if shard else "") + ") ..."
        )
        with pl_module.ema_model() as model:
            # Lightning's teardown has moved the module to the CPU before on_fit_end: audit on the training device.
            model.to(trainer.strategy.root_device)
            result = run_audit(model, data, self.config, pl_module.defenses, run_dir, shard=shard)
        if not trainer.is_global_zero:
            return
        result["run"]["train_time_s"] = self._train_time
        result["run"]["steps"] = trainer.global_step
        # The audit through training (eval/periodic.py) hands its trajectory over by this method name, so that
        # this module need not import the callback that imports it.
        trajectory = next((c.trajectory_summary for c in trainer.callbacks if hasattr(c, "trajectory_summary")), None)
        if trajectory is not None:
            result["trajectory"] = trajectory()
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
def datamodule_audit_data(dm: pl.LightningDataModule) -> AuditData:
    """What the audit compares the model with, from a set-up data module (``members``, ``heldout``, ``manifest``,
    ``pool`` and, where the run has them, ``canaries``)."""
    canaries = getattr(dm, "canaries", None)
    return AuditData(
        members=dm.members, heldout=dm.heldout, copies=copies_per_member(dm.manifest, dm.members),
        pool=getattr(dm, "pool", None), manifest=dm.manifest, groups=dm.manifest.group_index(dm.members),
        canaries=canaries.table if canaries is not None else None,
        canary_included=canaries.included if canaries is not None else None,
    )


def load_audit_data(manifest: Manifest) -> AuditData:
    """Rebuild members, held-out images and the pool from the manifest's recorded data settings."""
    from ..train.canaries import Canaries, recorded_canaries
    from ..train.data import DiffusionDataModule, load_canaries

    source = {k: v for k, v in manifest.source.items() if k != "defenses"}
    dm = DiffusionDataModule(**source)
    pool = dm.load_pool()
    second = dm.load_heldout_source()
    everything = pool if second is None else type(pool).concat([pool, second])
    index = {image_id: row for row, image_id in enumerate(everything.ids)}
    missing = [i for i in manifest.members + manifest.heldout if i not in index]
    if missing:
        raise ValueError(
            f"the manifest names {len(missing)} image(s) the data source does not have (e.g. {missing[:3]}); "
            "the manifest does not match the data"
        )
    members = everything.select([index[i] for i in manifest.members])
    heldout = everything.select([index[i] for i in manifest.heldout])
    manifest.check_fingerprint(image_fingerprint(members, heldout), "the data source")
    data = AuditData(members, heldout, copies_per_member(manifest, members), pool, manifest, manifest.group_index(members))
    if manifest.canaries:
        spec = Canaries(count=int(manifest.canaries["count"]), path=manifest.canaries.get("path"))
        table = load_canaries(spec, dm.hparams.image_size, dm.hparams.channels, members.captions is not None,
                              dm.hparams.caption_column or "text")
        draw = recorded_canaries(manifest.canaries, table, manifest.num_classes)
        data.canaries, data.canary_included = draw.table, draw.included
    return data


def _unfinished_audit(audits: Path) -> Path | None:
    """The newest audit folder under ``audits`` left with finished shards and no audit.json (a killed audit)."""
    if not audits.is_dir():
        return None
    killed = [d for d in audits.iterdir() if (d / SHARD_FOLDER).is_dir() and not (d / "audit.json").exists()]
    return max(killed, key=lambda d: d.name, default=None)


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
            run directory (or beside the manifest), so the run's own audit.json is never overwritten; or
            the newest such folder whose audit was killed mid-sampling (it resumes from its finished shards
            when its settings, data and weights are those of this audit, and starts afresh otherwise).
        defenses: generation-side defenses to add to the sampler (e.g. an output filter).
    """
    from ..train.models import load_model

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
    stack = as_stack(defenses)
    training_only = [d.name for d in stack if not d.acts_on_generation()]
    if training_only:
        raise ValueError(
            f"defenses {training_only} act on training or data, not on generation: an audit of a saved model cannot "
            "apply them (train with them instead); --defenses takes generation-side defenses such as an output filter"
        )
    out_dir = Path(out) if out else (_unfinished_audit(run_dir / "audits")
                                      or run_dir / "audits" / time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    loaded_model = load_model(model_dir)
    loaded = Manifest.load(manifest_path)
    if list(loaded_model.image_shape) != list(loaded.image_shape):
        raise ValueError(f"model images are {loaded_model.image_shape} but the manifest's data are {tuple(loaded.image_shape)}")
    record_path = manifest_path.parent / DEFENSES_RECORD
    if record_path.is_file():
        training = DefenseRecord.load(record_path)
    else:
        rank_zero_warn(f"no {DEFENSES_RECORD} beside {manifest_path}: the model's training defenses and guarantees are reported as unknown")
        training = DefenseRecord(describe=UNKNOWN)
    data = load_audit_data(loaded)
    result = run_audit(loaded_model, data, audit or AuditConfig(), stack, out_dir, training=training)
    report_single_run(out_dir, result)
    print(f"privdiff audit: wrote {out_dir / 'audit.json'} and {out_dir / 'report.html'}")
    return result
