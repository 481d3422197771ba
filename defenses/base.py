"""The Defense contract and the stack that composes defenses.

A defense overrides only the stages it acts on, like a Lightning ``Callback``; every hook defaults
to "do nothing". The same instances serve the data module and the model (LightningCLI
``link_arguments(..., apply_on="instantiate")``), so state such as a privacy accountant exists once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
from torch import nn

from privdiff.files import write_json_atomic
from privdiff.membership import ImageTable, Manifest
from privdiff.model import Batch

if TYPE_CHECKING:  # for types only: Lightning and torch's loader are the trainer's business
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader



@dataclass
class GenerationContext:
    """What a generation-side defense may look at besides the images.

    ``reference`` holds the member images in [0, 1], flattened to (M, D); ``labels`` the class
    labels the samples were generated for (or None when unconditional); ``public_prompts`` captions
    of images that are not members (the audit's held-out calibration captions), from which a
    text-to-image defense may take a threshold.
    """

    reference: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    public_prompts: Sequence[str] | None = None


@dataclass(frozen=True)
class Guarantee:
    """A formal privacy guarantee a defense gives: (epsilon, delta)-DP for one privacy unit.

    ``holds`` is False when a setting voids it (e.g. DP noise drawn from a known seed); ``caveats``
    name what the guarantee does not cover. ``defense`` is filled in by the stack.
    """

    epsilon: float
    delta: float
    accountant: str
    privacy_unit: str
    steps: int | None = None
    budget: float | None = None
    holds: bool = True
    caveats: tuple[str, ...] = ()
    defense: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "caveats": list(self.caveats)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Guarantee":
        return cls(**{**data, "caveats": tuple(data.get("caveats", ()))})


class Defense:
    """Base class: stage hooks that all default to doing nothing.

    Subclasses set ``name`` (used to prefix metrics: ``defense/<name>/<metric>``), set
    ``owns_optimizer = True`` when they replace the optimizer, so that the stack can refuse two, and
    set ``order`` to the stage they act on first: the stack runs defenses by it (data 10,
    training 20, generation 30; ties keep the configured order), so stacking config files in any
    order gives the same run (dedup before DP-SGD).
    """

    name: str = "defense"
    owns_optimizer: bool = False
    order: int = 20

    # -- data ---------------------------------------------------------------------------------
    def transform_dataset(self, dataset: ImageTable, manifest: Manifest) -> ImageTable:
        """Return the training set this defense allows (it may record what it removed in ``manifest``)."""
        return dataset

    def on_data_ready(self, num_examples: int, batch_size: int) -> None:
        """Learn the final training-set size and the expected batch size (after every data transform)."""

    # -- training -----------------------------------------------------------------------------
    def check_trainer(self, trainer: "pl.Trainer") -> None:
        """Raise ``ValueError`` for trainer settings this defense cannot honour."""

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` before training for a model (a ``privdiff.model.DiffusionModel``) this defense cannot act on."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Return the module whose parameters are trained (e.g. an Opacus ``GradSampleModule``)."""
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """Return the optimizer to step (e.g. an Opacus ``DPOptimizer``)."""
        return optimizer

    def wrap_train_loader(self, loader: "DataLoader") -> "DataLoader":
        """Return the training loader (e.g. Poisson sampling)."""
        return loader

    def transform_batch(self, batch: Batch) -> Batch:
        """Return the training batch to train on (e.g. randomized captions); called every training step."""
        return batch

    def draws_per_example(self) -> int:
        """How many (timestep, noise) draws of each example a training batch holds (DPDM's noise multiplicity)."""
        return 1

    def backward_inputs(self, model: nn.Module) -> list[torch.Tensor] | None:
        """The tensors the training loss's backward pass must reach (``loss.backward(inputs=...)``),
        or None for all leaves (the default: every parameter gets its gradient)."""
        return None

    def on_before_optimizer_step(self, model: nn.Module) -> None:
        """Called after backward, before the optimizer step (e.g. to reduce per-sample gradients)."""

    def should_stop(self) -> str | None:
        """Return a reason to stop training before the next step, or None to go on."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint and resume (e.g. the accountant's history)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def check_resume(self, state: dict[str, Any] | None, steps_done: int) -> None:
        """Raise ``ValueError`` when a checkpoint of ``steps_done`` steps cannot be resumed with this defense
        (``state``: what this defense saved in it, None when it was not in that run)."""

    def account_redone(self, steps: int) -> str | None:
        """A resume will train ``steps`` steps again whose first results already left the process (an export, a
        checkpoint): count what they spent, and say so (None: nothing to count, the default)."""
        return None

    # -- generation ---------------------------------------------------------------------------
    def adjust_condition(self, model: Any, cond: Any, generator: torch.Generator, context: GenerationContext) -> Any:
        """Return the conditioning to sample a batch from (``model`` a ``privdiff.model.DiffusionModel``; ``cond``
        the batch's labels, prompts or prompt embedding), e.g. a prompt embedding moved away from memorization.
        Default: unchanged. ``generator`` is the batch's sampling generator: do not draw from it."""
        return cond

    def acts_on_generation(self) -> bool:
        """Whether this defense acts on sampling (filters samples or adjusts their conditioning)."""
        return type(self).keep_mask is not Defense.keep_mask or type(self).adjust_condition is not Defense.adjust_condition

    def keep_mask(self, images: torch.Tensor, context: GenerationContext) -> torch.Tensor | None:
        """Return a bool tensor (B,) of samples to keep, or None to keep all. Images are in [0, 1]."""
        return None

    # -- reporting ----------------------------------------------------------------------------
    def metrics(self) -> dict[str, float | int | str]:
        """Numbers for the report (epsilon spent, images removed, reject rate, ...)."""
        return {}

    def audit_evidence(self) -> dict[str, Any]:
        """What the training leaves for an audit plugin, by name (e.g. DP-SGD's gradient canaries); plain JSON."""
        return {}

    def guarantee(self) -> Guarantee | None:
        """The formal guarantee this defense gives (e.g. (epsilon, delta)-DP), or None (the default)."""
        return None

    def describe(self) -> str:
        """A short label for report tables."""
        return self.name


class DefenseStack:
    """Applies defenses by stage (``Defense.order``); refuses a defense twice and two that own the optimizer."""

    def __init__(self, defenses: Iterable[Defense] | None = None) -> None:
        self.defenses: list[Defense] = sorted(defenses or [], key=lambda d: d.order)
        names = [d.name for d in self.defenses]
        if len(set(names)) != len(names):
            raise ValueError(
                f"each defense may appear once in a run, got {names}: two stacked config files list the same "
                "defense (e.g. defense/dedup.yaml with defense/dedup_dp_sgd.yaml); keep one of them"
            )
        owners = [d.name for d in self.defenses if d.owns_optimizer]
        if len(owners) > 1:
            raise ValueError(
                f"defenses {owners} both replace the optimizer; keep one of them in `defenses:`"
            )

    def __iter__(self):
        return iter(self.defenses)

    def __len__(self) -> int:
        return len(self.defenses)

    def transform_dataset(self, dataset: ImageTable, manifest: Manifest) -> ImageTable:
        for d in self.defenses:
            dataset = d.transform_dataset(dataset, manifest)
            if len(dataset) == 0:
                raise ValueError(
                    f"defense '{d.name}' removed every training image; loosen its settings "
                    "(e.g. a lower dedup threshold) or check the data"
                )
        return dataset

    def on_data_ready(self, num_examples: int, batch_size: int) -> None:
        for d in self.defenses:
            d.on_data_ready(num_examples, batch_size)

    def check_trainer(self, trainer: "pl.Trainer") -> None:
        for d in self.defenses:
            d.check_trainer(trainer)

    def check_model(self, model: Any) -> None:
        for d in self.defenses:
            d.check_model(model)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        for d in self.defenses:
            model = d.wrap_model(model)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        for d in self.defenses:
            optimizer = d.wrap_optimizer(optimizer, model)
        return optimizer

    def wrap_train_loader(self, loader: "DataLoader") -> "DataLoader":
        for d in self.defenses:
            loader = d.wrap_train_loader(loader)
        return loader

    def transform_batch(self, batch: Batch) -> Batch:
        for d in self.defenses:
            batch = d.transform_batch(batch)
        return batch

    def backward_inputs(self, model: nn.Module) -> list[torch.Tensor] | None:
        chosen = [inputs for d in self.defenses if (inputs := d.backward_inputs(model)) is not None]
        if len(chosen) > 1:
            raise ValueError("two defenses restrict the backward pass; at most one may")
        return chosen[0] if chosen else None

    def on_before_optimizer_step(self, model: nn.Module) -> None:
        for d in self.defenses:
            d.on_before_optimizer_step(model)

    def draws_per_example(self) -> int:
        return max([d.draws_per_example() for d in self.defenses] + [1])

    def should_stop(self) -> str | None:
        for d in self.defenses:
            reason = d.should_stop()
            if reason:
                return reason
        return None

    def state_dict(self) -> dict[str, Any]:
        return {d.name: d.state_dict() for d in self.defenses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for d in self.defenses:
            if d.name in state:
                d.load_state_dict(state[d.name])

    def resume(self, state: dict[str, Any], steps_done: int, redone: int = 0) -> list[str]:
        """Check, then restore, what a checkpoint of ``steps_done`` steps saved (``state_dict``'s output).

        ``redone``: steps after the checkpoint whose results were already released (exported or checkpointed); each
        defense counts them (:meth:`Defense.account_redone`). Returns what the defenses said they counted.
        """
        for d in self.defenses:
            d.check_resume(state.get(d.name), steps_done)
        self.load_state_dict(state)
        said = [d.account_redone(redone) for d in self.defenses] if redone > 0 else []
        return [f"{d.name}: {text}" for d, text in zip(self.defenses, said) if text]

    def adjust_condition(self, model: Any, cond: Any, generator: torch.Generator, context: GenerationContext) -> Any:
        for d in self.defenses:
            cond = d.adjust_condition(model, cond, generator, context)
        return cond

    def keep_mask(self, images: torch.Tensor, context: GenerationContext) -> torch.Tensor:
        keep = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        for d in self.defenses:
            mask = d.keep_mask(images, context)
            if mask is not None:
                keep &= mask.to(device=keep.device, dtype=torch.bool)
        return keep

    def metrics(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {}
        for d in self.defenses:
            for key, value in d.metrics().items():
                out[f"defense/{d.name}/{key}"] = value
        return out

    def guarantees(self) -> list[Guarantee]:
        """Every defense's formal guarantee, named by its defense."""
        out = []
        for d in self.defenses:
            g = d.guarantee()
            if g is not None:
                out.append(Guarantee(**{**g.to_dict(), "caveats": g.caveats, "defense": d.name}))
        return out

    def describe(self) -> str:
        return " + ".join(d.describe() for d in self.defenses) or "none"

    def record(self) -> DefenseRecord:
        """The stack's label, metrics and guarantees now (what ``defenses.json`` keeps)."""
        evidence = {k: v for d in self.defenses for k, v in d.audit_evidence().items()}
        return DefenseRecord(self.describe(), self.metrics(), self.guarantees(), evidence)

    def find(self, name: str) -> Defense | None:
        """Return the defense called ``name``, or None."""
        return next((d for d in self.defenses if d.name == name), None)


DEFENSES_RECORD = "defenses.json"  # a run's DefenseRecord at the end of training, in its run directory


@dataclass
class DefenseRecord:
    """What a run's defenses did and guarantee, kept with the run (``defenses.json``) for later audits.

    ``describe`` is the stack's label, ``metrics`` its prefixed numbers, ``guarantees`` the formal
    guarantees. A re-audit of a saved model merges the record of its training with the record of
    the generation-side defenses it adds.
    """

    describe: str = "none"
    metrics: dict[str, Any] = field(default_factory=dict)
    guarantees: list[Guarantee] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)  # Defense.audit_evidence of every defense

    def merged(self, other: "DefenseRecord") -> "DefenseRecord":
        labels = [d for d in (self.describe, other.describe) if d != "none"]
        return DefenseRecord(" + ".join(labels) or "none", {**self.metrics, **other.metrics}, [*self.guarantees, *other.guarantees],
                             {**self.evidence, **other.evidence})

    def to_dict(self) -> dict[str, Any]:
        return {"describe": self.describe, "metrics": self.metrics, "guarantees": [g.to_dict() for g in self.guarantees],
                "evidence": self.evidence}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DefenseRecord":
        return cls(data.get("describe", "none"), dict(data.get("metrics", {})), [Guarantee.from_dict(g) for g in data.get("guarantees", [])],
                   dict(data.get("evidence", {})))

    def save(self, path: str | Path) -> None:
        """Write JSON atomically."""
        write_json_atomic(path, self.to_dict(), default=float)

    @classmethod
    def load(cls, path: str | Path) -> "DefenseRecord":
        return cls.from_dict(json.loads(Path(path).read_text()))


def as_stack(defenses: DefenseStack | Sequence[Defense] | None) -> DefenseStack:
    """Accept a stack, a list of defenses or None (no defense)."""
    if isinstance(defenses, DefenseStack):
        return defenses
    return DefenseStack(defenses)
