"""DP-SGD (Abadi et al. 2016) for the diffusion trainer, assembled from Opacus's parts.

Per-example gradients come from Opacus's ``GradSampleModule`` (privdiff's subclass with a faster
convolution rule, and a backward pass that skips the discarded parameter gradients: see
``per_sample_grads``); Opacus's ``DPOptimizer`` clips each example's gradient to ``max_grad_norm``,
sums, adds Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` and divides by
the expected batch size; a ``DPDataLoader`` draws Poisson batches (each row independently with probability q = batch_size / N); an Opacus
accountant (PRV, Gopi et al. 2021, or RDP, Mironov 2017) turns the steps taken into (epsilon, delta).
Everything runs inside the documented Lightning hooks the Defense contract exposes. This module
wires the parts, cut as Opacus cuts them: the arguments and their checks (:mod:`.dp_settings`), the
wrapped model and optimizer (:mod:`.dp_wrapping`), Poisson sampling (:mod:`.dp_sampling`), the
accountant and budget (:mod:`.dp_budget`) and where the randomness comes from (:mod:`.dp_randomness`).

Under DDP (``trainer.strategy: ddp``, any number of devices and nodes) the processes share one
global Poisson batch (:mod:`.dp_sampling`, expected size ``batch_size``, the
same q = batch_size / N), Opacus's ``DistributedDPOptimizer`` adds the noise once (on rank 0) and
sums the clipped gradients of all processes, and every rank's accountant records the same steps:
epsilon is that of one process with the same batch size and steps.

Noise multiplicity (Dockhorn et al. 2023, DPDM, Sec. 3.2): each image gets K (timestep, noise)
draws; the K per-row gradients of one image are averaged *before* clipping, so one image still
contributes at most ``max_grad_norm`` to an update.

The privacy unit is one training *row*. An image that appears k times in the training set (a
planted or natural duplicate) is protected only at group-privacy level (about k*epsilon): run
dedup before DP-SGD.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from .base import Defense, Guarantee
from .dp_budget import PrivacyLedger, plan_noise, saved_history
from .dp_randomness import DPRandomness
from .dp_sampling import poisson_loader
from .dp_settings import AccountantName, DPSGDSettings, GradSampleMode
from .dp_wrapping import PrivateTraining, device_of, per_image_gradients
from .gradient_canaries import GradientCanaries

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["PRIVACY_UNIT", "DPSGDDefense"]

PRIVACY_UNIT = (
    "one training row: an image present k times in the training set is protected only at "
    "group-privacy level (about k*epsilon); deduplicate before DP-SGD"
)
STATE_VERSION = 2  # 2: the accountant's own state_dict (same keys as 1's hand-written one)


class DPSGDDefense(Defense):
    """Differentially private training with DP-SGD (Abadi et al. 2016) from Opacus's parts.

    Give exactly one of ``noise_multiplier`` (sigma, fixed) and ``target_epsilon`` (sigma is then
    chosen so that the planned number of steps spends at most ``target_epsilon``; training stops
    before a step that would exceed it).

    Args:
        max_grad_norm: clipping bound C of one image's gradient (> 0).
        noise_multiplier: sigma; the noise added to the summed clipped gradients has standard
            deviation sigma * C.
        target_epsilon: the epsilon budget at ``delta``; sigma is computed with Opacus's
            ``get_noise_multiplier`` for ``steps`` steps at sample rate batch_size / N.
        delta: the delta of (epsilon, delta)-DP. The default 1e-5 must stay below 1/N (a
            mechanism that publishes one random row in full is (0, 1/N)-DP); for N >= 1e5 set a
            smaller one, e.g. 1/N**1.1.
        steps: steps the sigma of ``target_epsilon`` is planned for; default ``trainer.max_steps``
            (or ``max_epochs`` times the Poisson loader's 1/q batches per epoch).
        max_epsilon: with a fixed ``noise_multiplier``, stop before a step that would spend more
            than this (optional).
        accountant: ``prv`` (Gopi et al. 2021, tight) or ``rdp`` (Mironov 2017, an upper bound).
        noise_multiplicity: K (timestep, noise) draws per image (DPDM); the K per-row gradients
            of an image are averaged before clipping. The batch holds B*K rows (memory x K).
        grad_sample_mode: ``hooks`` (Opacus's per-layer rules; convolutions get contiguous
            inputs, see ``dp_wrapping.contiguous_inputs``) or ``functorch`` (vmap of per-layer gradients).
            ``ghost`` is refused: Opacus's ghost clipping needs two backward passes over the
            per-row loss vector, which Lightning's one ``loss.backward()`` on the mean does not give.
        poisson_sampling: must be True. The accountants assume Poisson subsampling; shuffled
            fixed-size batches are not covered by the epsilon they report, so False is refused.
        max_physical_batch_size: split each Poisson batch into chunks of at most this many images
            (Opacus ``BatchMemoryManager``): one DP step per logical batch. Lightning then counts
            every chunk as a step (``max_steps``, LR schedule, EMA, logging), the accountant only
            logical batches; planning sigma from ``max_steps`` is then conservative.
        new_budget: accept a checkpoint whose sigma, sample rate, data size, delta or accountant
            differ from this run's. The spent history is kept and composed with the new steps:
            epsilon is never reset, because the weights carry every earlier step.
        secure_mode: Opacus's noise that resists floating-point attacks, drawn from torchcsprng's
            /dev/urandom generator where that package is installed (see ``dp_randomness``).
        gradient_canaries: m white-box gradient canaries in the DP step (``defenses.gradient_canaries``) for a one-run
            audit of the step itself (``privdiff.eval.one_run.OneRunAudit`` in the audit config): each costs one
            coordinate of the model. 0: none. A one-run audit can prove at most about ln(m / ln(1/beta)).
        debug_noise_seed: for debugging only. By default the Poisson batches and the noise come
            from fresh OS entropy at every process start (never from the run's seed, never replayed
            by a resume); with a number they are a function of it, so anyone who knows it can
            regenerate the noise: epsilon does not hold, and the report says so.
    """

    name = "dp_sgd"
    owns_optimizer = True

    def __init__(
        self,
        *,
        max_grad_norm: float = 1.0,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        steps: int | None = None,
        max_epsilon: float | None = None,
        accountant: AccountantName = "prv",
        noise_multiplicity: int = 1,
        grad_sample_mode: GradSampleMode = "hooks",
        poisson_sampling: bool = True,
        max_physical_batch_size: int | None = None,
        new_budget: bool = False,
        secure_mode: bool = False,
        debug_noise_seed: int | None = None,
        gradient_canaries: int = 0,
    ) -> None:
        settings = DPSGDSettings(
            max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta,
            steps=steps, max_epsilon=max_epsilon, accountant=accountant, noise_multiplicity=noise_multiplicity,
            grad_sample_mode=grad_sample_mode, poisson_sampling=poisson_sampling,
            max_physical_batch_size=max_physical_batch_size, gradient_canaries=gradient_canaries,
        )
        settings.validate()
        self.max_grad_norm = float(max_grad_norm)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.max_epsilon = None if max_epsilon is None else float(max_epsilon)
        self.delta = float(delta)
        self.steps_arg = steps
        self.planned_steps: int | None = steps  # resolved in check_trainer when not given
        self.accountant_name: str = accountant
        self.noise_multiplicity = int(noise_multiplicity)
        self.grad_sample_mode = grad_sample_mode
        self.poisson_sampling = True
        self.max_physical_batch_size = max_physical_batch_size
        self.new_budget = bool(new_budget)
        self.randomness = DPRandomness(secure_mode=secure_mode, debug_seed=debug_noise_seed)
        self.gradient_canaries = int(gradient_canaries)
        self.canaries = GradientCanaries(self.gradient_canaries, self.randomness.generator("canaries")) if gradient_canaries else None

        self.noise_multiplier: float | None = None if noise_multiplier is None else float(noise_multiplier)
        self.num_examples: int | None = None
        self.batch_size: int | None = None
        self.sample_rate: float | None = None
        self.ledger = PrivacyLedger(accountant, self.delta)
        self._sigma_from_checkpoint = False
        self.wrappers = PrivateTraining()  # the GradSampleModule, the DPOptimizer and the DDP processes

    # -- data ---------------------------------------------------------------------------------
    def on_data_ready(self, num_examples: int, batch_size: int) -> None:
        if num_examples < 1 or batch_size < 1:
            raise ValueError(f"dp_sgd needs num_examples >= 1 and batch_size >= 1, got {num_examples} and {batch_size}")
        if self.delta >= 1.0 / num_examples:
            raise ValueError(
                f"dp_sgd delta={self.delta:g} must be below 1/N={1.0 / num_examples:g} for N={num_examples} "
                f"training rows; set delta to e.g. {num_examples ** -1.1:.1e} (1/N^1.1)"
            )
        sample_rate = min(1.0, batch_size / num_examples)
        if self.wrappers.optimizer is not None and sample_rate != self.sample_rate:
            raise ValueError(
                f"dp_sgd: the data changed after the optimizer was built (sample rate {self.sample_rate} -> {sample_rate})"
            )
        if self.sample_rate is not None and sample_rate != self.sample_rate and self.target_epsilon is not None and not self._sigma_from_checkpoint:
            self.noise_multiplier = None  # planned for another sample rate: plan again
        self.num_examples, self.batch_size, self.sample_rate = int(num_examples), int(batch_size), sample_rate
        self.ledger.changed()

    # -- training -----------------------------------------------------------------------------
    def check_trainer(self, trainer: "pl.Trainer") -> None:
        from lightning.pytorch.utilities import rank_zero_info

        self.wrappers.check_trainer(trainer, self.max_grad_norm)
        if self.target_epsilon is not None:
            self.planned_steps = self._planned_steps(trainer)
        if self.noise_multiplier is None:
            self._plan_noise(self.planned_steps)
        if self.noise_multiplicity > 1:
            rank_zero_info(
                f"privdiff: dp_sgd noise multiplicity K={self.noise_multiplicity}: each image is seen with "
                f"K noise draws (batches hold K x rows); the K gradients are averaged before clipping"
            )

    def _planned_steps(self, trainer: "pl.Trainer | None" = None) -> int:
        if self.steps_arg is not None:
            return self.steps_arg
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        if trainer is not None and trainer.max_epochs and trainer.max_epochs > 0 and self.sample_rate:
            return int(trainer.max_epochs) * int(1 / self.sample_rate)
        raise ValueError(
            f"dp_sgd target_epsilon={self.target_epsilon} needs the number of planned steps: set "
            "trainer.max_steps or dp_sgd steps"
        )

    def _plan_noise(self, steps: int) -> float:
        """Set sigma so that ``steps`` Poisson-sampled steps spend at most ``target_epsilon``."""
        self._require_data()
        sigma = plan_noise(self.target_epsilon, self.delta, self.sample_rate, steps, self.accountant_name)
        self.planned_steps = steps
        self.noise_multiplier = float(sigma)
        self.ledger.changed()
        return self.noise_multiplier

    def _require_data(self) -> None:
        if self.sample_rate is None:
            raise ValueError(
                "dp_sgd does not know the data yet: on_data_ready(num_examples, batch_size) must run first "
                "(the data module calls it in setup)"
            )

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """``model`` in privdiff's ``GradSampleModule`` (``dp_wrapping``), wrapped once only."""
        return self.wrappers.wrap_model(model, self.grad_sample_mode, self.noise_multiplicity)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """``optimizer`` in a DPOptimizer whose steps the accountant counts (sigma planned first if needed)."""
        if isinstance(optimizer, DPOptimizer):
            return optimizer
        self._require_data()
        if self.noise_multiplier is None:
            self._plan_noise(self._planned_steps())
        dp_optimizer = self.wrappers.wrap_optimizer(
            optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            # Never the global generator: Lightning seeds it from the public seed and replays it on a resume.
            generator=self.randomness.generator("noise", device_of(model), self.steps),
            secure_mode=self.randomness.secure_mode,
            step_hook=self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate),
        )
        if self.canaries is not None and self.wrappers.world_size > 1:
            # Each process would place and sample them from its own entropy; shared placement is not built yet.
            warnings.warn(f"dp_sgd gradient_canaries={self.gradient_canaries} are not inserted under DDP ({self.wrappers.world_size} "
                          "processes): the one-run audit of the DP step is skipped for this run; train on one process to run it")
            self.canaries = None
        if self.canaries is not None:
            names = {id(p): n for n, p in model.named_parameters()}
            self.canaries.place(dp_optimizer.params, [names.get(id(p), "?") for p in dp_optimizer.params])
            self.canaries.attach(dp_optimizer, self.sample_rate)
        return dp_optimizer

    @property
    def expected_batch_size(self) -> int:
        self._require_data()
        return max(1, round(self.sample_rate * self.num_examples))

    def wrap_train_loader(self, loader: DataLoader) -> DataLoader:
        if isinstance(loader, DPDataLoader) or getattr(loader, "_privdiff_dp", False):
            return loader
        self._require_data()
        if isinstance(loader.dataset, IterableDataset):
            raise ValueError("dp_sgd needs a map-style dataset for Poisson sampling, got an IterableDataset")
        if len(loader.dataset) != self.num_examples:
            raise ValueError(
                f"dp_sgd was told N={self.num_examples} training rows but the loader holds {len(loader.dataset)}"
            )
        rank, world = self.wrappers.rank, self.wrappers.world_size
        return poisson_loader(
            loader, self.sample_rate,
            # never the global generator: Lightning seeds it from the public seed and replays it on a resume
            generator=self.randomness.generator("poisson", "cpu", self.steps) if world == 1 else None,
            shared_generator=(lambda: self.randomness.shared_generator("poisson", rank, self.steps)) if world > 1 else None,
            rank=rank, world_size=world, max_physical_batch_size=self.max_physical_batch_size, optimizer=self.wrappers.optimizer,
        )

    def backward_inputs(self, model: nn.Module) -> list[torch.Tensor] | None:
        """Backward to the layers' inputs only (one process): the summed parameter gradients are discarded anyway."""
        return self.wrappers.backward_inputs(model)

    def on_before_optimizer_step(self, model: nn.Module) -> None:
        """Turn per-row gradients into per-image ones (the K draws of an image averaged) before the DPOptimizer clips them."""
        per_image_gradients(model, self.noise_multiplicity)

    def draws_per_example(self) -> int:
        return self.noise_multiplicity

    def check_resume(self, state: dict[str, Any] | None, steps_done: int) -> None:
        """A checkpoint whose steps ran without DP-SGD cannot be resumed as if nothing was spent."""
        if state is None and steps_done > 0 and not self.new_budget:
            raise ValueError(
                f"the checkpoint's {steps_done} training steps ran without dp_sgd: epsilon would not cover them. "
                "Resume it without dp_sgd, or, if those steps saw public data only, set dp_sgd new_budget: true "
                "to start accounting here"
            )

    def account_redone(self, steps: int) -> str | None:
        """Count ``steps`` released steps the resume trains again: their first run's weights left the process, so
        epsilon covers both runs of them (at the sigma and sample rate they ran with: the history's last)."""
        if steps <= 0:
            return None
        self.ledger.count_again(steps, self.noise_multiplier, self.sample_rate)
        return (f"the {steps} steps after the checkpoint were already released (an export or a checkpoint of them is "
                f"on disk) and run again now: both runs are counted, the accountant holds {self.steps} steps")

    # -- the budget (defenses/dp_budget.py keeps the accountant) -------------------------------------
    @property
    def accountant(self) -> Any:
        """Opacus's accountant holding the (sigma, q, steps) history of this run."""
        return self.ledger.accountant

    @property
    def steps(self) -> int:
        """DP steps taken (and accounted) so far, including any restored from a checkpoint."""
        return self.ledger.steps

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` by the configured accountant (0 before the first step)."""
        return self.ledger.epsilon()

    @property
    def budget(self) -> float | None:
        """The epsilon training must not exceed (``target_epsilon`` or ``max_epsilon``), or None."""
        return self.target_epsilon if self.target_epsilon is not None else self.max_epsilon

    def should_stop(self) -> str | None:
        """Stop before a step after which epsilon would exceed the budget (the message names both)."""
        budget = self.budget
        if budget is None or self.noise_multiplier is None or self.sample_rate is None:
            return None
        after = self.ledger.over_budget_next(budget, self.noise_multiplier, self.sample_rate, self.planned_steps)
        if after is None:
            return None
        return (
            f"dp_sgd privacy budget reached: epsilon={self.epsilon():.4g} spent after {self.steps} steps; one more step "
            f"would spend {after:.4g} > budget {budget:g} (delta={self.delta:g}, {self.accountant_name} accountant)"
        )

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "accountant": self.ledger.state_dict(),  # Opacus's: {"history": [(sigma, q, steps)], "mechanism"}
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "num_examples": self.num_examples,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplicity": self.noise_multiplicity,
            "steps": self.steps,
            **({"canaries": self.canaries.state_dict()} if self.canaries is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the accountant's history (replacing, never adding to, the current one).

        Refuses a state whose sigma, sample rate, data size, delta or accountant differ from this
        run's unless ``new_budget=True``. With ``target_epsilon`` the saved sigma is kept (the
        budget was planned with it) and training stops when the budget is spent.
        """
        if not state:
            return
        history = saved_history(  # Opacus validates the saved accountant state; refused if the settings differ
            state, num_examples=self.num_examples, sample_rate=self.sample_rate, delta=self.delta,
            accountant=self.accountant_name, noise_multiplier=self.noise_multiplier,
            target_epsilon=self.target_epsilon, new_budget=self.new_budget,
        )
        self.ledger.replace_history(history)
        if self.canaries is not None and state.get("canaries"):
            self.canaries.load_state_dict(state["canaries"])
        saved_sigma = state.get("noise_multiplier")
        if self.target_epsilon is not None and saved_sigma is not None and not self.new_budget:
            self.noise_multiplier = float(saved_sigma)
            self._sigma_from_checkpoint = True
        if self.wrappers.optimizer is not None and self.noise_multiplier is not None:
            self.wrappers.optimizer.noise_multiplier = self.noise_multiplier
        self.ledger.changed()

    # -- reporting ------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier if self.noise_multiplier is not None else float("nan"),
            "steps": self.steps,
            "sample_rate": self.sample_rate if self.sample_rate is not None else float("nan"),
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplicity": self.noise_multiplicity,
            "accountant": self.accountant_name,
            "privacy_unit": PRIVACY_UNIT,
            "randomness": self.randomness.describe(),
        }
        if self.budget is not None:
            out["epsilon_budget"] = self.budget
        return out

    def audit_evidence(self) -> dict[str, Any]:
        """The gradient canaries' record with the claim they test (none without canaries)."""
        if self.canaries is None:
            return {}
        return {"gradient_canaries": {**self.canaries.evidence(), "claimed_epsilon": self.epsilon(), "delta": self.delta,
                                      "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm}}

    def guarantee(self) -> Guarantee:
        """(epsilon, delta)-DP of the trained weights for one training row, by the configured accountant."""
        caveats = ["covers the training steps only: not the choice of hyper-parameters on the same data, nor pre-trained weights"]
        if not self.randomness.holds:
            caveats.insert(0, f"does NOT hold: {self.randomness.describe()}")
        if self.budget is not None and self.epsilon() > self.budget:
            caveats.insert(0, f"over its budget of epsilon={self.budget:g}")
        return Guarantee(
            epsilon=self.epsilon(), delta=self.delta, accountant=self.accountant_name, privacy_unit=PRIVACY_UNIT,
            steps=self.steps, budget=self.budget, holds=self.randomness.holds, caveats=tuple(caveats),
        )

    def describe(self) -> str:
        if self.target_epsilon is not None:
            return f"dp_sgd(eps<={self.target_epsilon:g}, delta={self.delta:g})"
        return f"dp_sgd(sigma={self.noise_multiplier:g}, C={self.max_grad_norm:g})"
