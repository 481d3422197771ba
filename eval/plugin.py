"""The audit's plugin contract: every attack and metric the audit config lists by ``class_path``.

A plugin is configured by its ``__init__`` arguments (``audit.attacks.<name>.init_args`` in YAML),
checks before training that it can run (``check``), and turns an :class:`AuditContext` (the
model, its samples, the members and held-out images) into an :class:`AuditResult`. The result says
what goes into ``audit.json``, which columns the report table shows (with header, unit and role),
which numbers the loggers get, and how often each of its criteria flags real held-out images.
The audit runs the listed plugins in order; the report and ``privdiff compare`` read only what
results wrote, so a new attack needs no edit outside its own file and the audit config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from privdiff.membership import ImageTable, Manifest
from privdiff.model import GenerativeModel
from privdiff.shard import Shard

from .sample_stream import SampleReduction, reduce_at_once

__all__ = ["AuditContext", "AuditData", "AuditPlugin", "AuditResult", "Cases", "Column", "Privacy", "setting_panels",
           "table_condition"]


@dataclass
class AuditData:
    """What the audit compares the model with: unique members, held-out images, copies, the pool for FID."""

    members: ImageTable
    heldout: ImageTable
    copies: Tensor  # (M,) training rows of each member (0: a data defense removed it)
    pool: ImageTable | None = None
    manifest: Manifest | None = None
    groups: Tensor | None = None  # (M,) the row of each member's group of near-copies (None: every member alone)
    calibration: ImageTable | None = None  # held-out images set aside for thresholds (None: the audit splits heldout)
    canaries: ImageTable | None = None  # input canaries of the one-run audit (never members), None when the run had none
    canary_included: Tensor | None = None  # (m,) bool: which canaries were put into training

    def group_of(self) -> Tensor:
        """(M,) group of each member: the row of its group's first member (near-copies are one image)."""
        return self.groups if self.groups is not None else torch.arange(len(self.members))

    def group_copies(self) -> Tensor:
        """(M,) training rows of each member's whole group (copies of near-copies add up)."""
        groups = self.group_of()
        totals = torch.zeros(len(groups), dtype=torch.long).index_add_(0, groups, self.copies.long())
        return totals[groups]


@dataclass
class AuditContext:
    """What a plugin may look at. The runner draws the audit's samples in shards and gives each plugin what its
    :meth:`AuditPlugin.reduction` kept of them (:meth:`AuditPlugin.reduced`); ``samples`` holds the generated images
    in [0, 1] themselves (after the generation-side defenses) only where a plugin without a reduction reads them, or
    where the context was built by hand with them, and ``sample_labels`` the class each was drawn for (or None).

    The held-out images come in two parts: ``calibration`` (set aside to take thresholds from) and
    ``heldout`` (the rest: non-members of membership inference, and where a threshold's false-flag
    rate is measured). ``flag_rate`` is the share of real held-out images a calibrated criterion may flag.
    """

    model: GenerativeModel
    data: AuditData
    samples: Tensor
    sample_labels: Tensor | None = None
    seed: int = 0
    batch_size: int = 256
    progress: bool = False
    shard: Shard | None = None
    calibration: ImageTable | None = None
    heldout: ImageTable | None = None
    flag_rate: float = 0.01
    steps: int = 50  # the audit sampler's steps
    # sampler(prompts, seed, steps=None) -> eval.sampling.Generated: more samples through the audit's sampler and the
    # run's generation-side defenses (for attacks that choose their own prompts); None where the audit gives none
    sampler: Callable[..., Any] | None = None
    # per-caption detection scores already computed in this audit, keyed by scoring settings and caption
    # (eval.caption_scores.caption_scores): the detection plugin and the prompt-extraction screen share them
    caption_scores: dict[Any, tuple[float, float]] = field(default_factory=dict)
    # what several plugins compute from the same inputs (the extraction thresholds, the model's reconstruction
    # floor), keyed by what computes it: see ``memoized``
    memo: dict[Any, Any] = field(default_factory=dict)
    # what the training left for the audit, by name (``Defense.audit_evidence``: DP-SGD's gradient canaries)
    evidence: Mapping[str, Any] = field(default_factory=dict)
    # the privacy the run's defenses claim (the audit.json "privacy" entry: epsilon, delta, holds, ...)
    claimed: Mapping[str, Any] = field(default_factory=dict)
    # copy_thresholds(space) -> {"tau", "delta", "calibrated_threshold": Threshold}: the copy criteria of the audit's
    # extraction attack as configured, computed once by the runner; what another plugin that flags copies uses
    copy_thresholds: Callable[[str], Mapping[str, Any]] | None = None
    # the audit's samples as each plugin's SampleReduction kept them (keyed by id of the plugin), where the runner
    # streamed them in shards (then ``samples`` is empty and ``sample_count`` says how many there were)
    reductions: dict[int, Any] = field(default_factory=dict)
    sample_count: int | None = None

    @property
    def num_samples(self) -> int:
        """How many samples the audit drew (and kept through the generation-side defenses)."""
        return self.sample_count if self.sample_count is not None else len(self.samples)

    def memoized(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per audit for ``key`` (a hashable of everything the result depends on but the context)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    @cached_property
    def members(self) -> Tensor:
        """The members in [0, 1], (M, C, H, W): every distance is defined on these pixels (converted once)."""
        return self.data.members.unit()


def table_condition(table: ImageTable, model: GenerativeModel) -> Tensor | list[str] | None:
    """The conditioning of a table's images for ``model``: class labels, captions, or None."""
    if model.conditioning == "class":
        return table.labels.clamp(min=0)
    if model.conditioning == "text":
        if table.captions is None:
            raise ValueError("a text-to-image model is queried with the images' captions, and these images have none")
        return list(table.captions)
    return None


class Privacy:
    """Column roles: ``PRIVACY`` columns are leakage (lower = more private), ``UTILITY`` ones quality (lower = better)."""

    PRIVACY = "privacy"
    UTILITY = "utility"


@dataclass
class Column:
    """One column of the report table: ``value`` for JSON and figures, ``text`` as the table shows it."""

    key: str
    header: str
    unit: str
    value: float | int | str | None
    text: str
    role: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Cases:
    """Generated samples next to the member each copies (shown in the report's grid; training images!)."""

    samples: Tensor
    nearest: Tensor
    distance: Tensor
    member_ids: list[str] = field(default_factory=list)
    flagged_by: list[str] = field(default_factory=list)  # which attack flagged each
    copies: list[int] = field(default_factory=list)  # training rows of each member's group
    captions: list[str] = field(default_factory=list)  # the caption of each member (text-to-image), shown under the pair


class AuditResult(ABC):
    """What one plugin found."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The plugin's entry in ``audit.json`` (plain JSON types)."""

    def columns(self) -> list[Column]:
        """Its columns in the report table (none by default)."""
        return []

    def scalars(self) -> dict[str, float]:
        """Numbers for the loggers, logged as ``audit/<key>``."""
        return {}

    def notes(self) -> list[str]:
        """Sentences for the report (how to read a number, a warning)."""
        return []

    def verdict(self) -> str | None:
        """One short clause for the report's verdict of the run (what was found, beside its control or claim); None: the
        report says its privacy and utility columns instead."""
        return None

    def heldout_flag_rates(self) -> dict[str, float]:
        """For each of its criteria, the share of real held-out images (never trained on) it flags."""
        return {}

    def cases(self) -> Cases | None:
        """Pairs for the report's grid of extracted cases, or None."""
        return None


@dataclass
class SummaryResult(AuditResult):
    """A result that is its JSON summary, with the held-out flag rate of each criterion and, optionally, cases."""

    summary: dict[str, Any]
    flag_rates: dict[str, float] = field(default_factory=dict)
    grid: Cases | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.summary

    def heldout_flag_rates(self) -> dict[str, float]:
        return self.flag_rates

    def cases(self) -> Cases | None:
        return self.grid


class AuditPlugin(ABC):
    """An attack or metric of the audit. Subclasses set ``name`` (its key in ``audit.json``)."""

    name: ClassVar[str] = "plugin"
    needs_samples: ClassVar[bool] = True
    # the audit signals it reads (``privdiff.eval.signals.SIGNALS``): the runner computes each once, before any plugin
    needs: ClassVar[tuple[str, ...]] = ()

    def check(self, num_members: int, num_heldout: int) -> None:
        """Raise ``ValueError`` before training when this plugin cannot run on data of these sizes."""

    def check_sampler(self, steps: int) -> None:
        """Raise ``ValueError`` before training when this plugin cannot run with the audit sampler's ``steps``."""

    def reduction(self, context: AuditContext) -> SampleReduction | None:
        """What this plugin keeps of each shard of the audit's samples (None: it reads no samples, or reads
        ``context.samples`` whole, which then holds every sample)."""
        return None

    def reduced(self, context: AuditContext) -> Any:
        """This plugin's reduction of the audit's samples: the runner's, streamed shard by shard; for a context built
        with its samples in hand, one pass over them."""
        if id(self) in context.reductions:
            return context.reductions[id(self)]
        reduction = self.reduction(context)
        if reduction is None:
            raise TypeError(f"{type(self).__name__} reads reduced samples but defines no reduction")
        return reduce_at_once(reduction, context.samples, context.sample_labels)

    @abstractmethod
    def run(self, context: AuditContext) -> AuditResult | None:
        """Attack or measure (no I/O); None when there is nothing to measure (e.g. no samples)."""

    @classmethod
    def figures(cls, runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Any]]:
        """Report figures (title, matplotlib figure) from the ``audit.json`` of several runs (none by default)."""
        return []

    def config(self) -> dict[str, Any]:
        """The plugin's settings as ``class_path`` + ``init_args`` (written into audit.json)."""
        import inspect

        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        init = {n: getattr(self, n) for n in names if hasattr(self, n)}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": _plain(init)}


def setting_panels(runs: Mapping[str, Mapping[str, Any]], key: str, height: float) -> tuple[Any, list[tuple[Any, str, Any]]] | None:
    """A row of matplotlib panels, one per setting whose audit has an entry ``key`` that applied: the figure and (axes,
    setting, entry) for each; None when no setting has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # an entry that says the attack did not apply to the model ({"not_applicable": why}) has nothing to draw
    panels = [(name, audit[key]) for name, audit in runs.items() if audit.get(key) and "not_applicable" not in audit[key]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), height), squeeze=False, layout="constrained")
    return fig, [(ax, name, entry) for ax, (name, entry) in zip(axes[0], panels)]


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
