"""DP-SGD's constructor arguments and the checks they must pass before anything is built.

The arguments are those of :class:`~.dp_sgd.DPSGDDefense` (and of its YAML ``init_args``); each
refusal says why the setting cannot be honoured and what to set instead. Two choices follow Opacus
and the literature: the accountants (PRV, Gopi et al. 2021; RDP, Mironov 2017) assume Poisson
subsampling, so fixed-size shuffled batches are refused; and noise multiplicity (Dockhorn et al.
2023, DPDM, Sec. 3.2) averages an image's K draws before clipping, which Opacus's ghost clipping
cannot do inside Lightning's single ``loss.backward()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["AccountantName", "DPSGDSettings", "GradSampleMode"]

GradSampleMode = Literal["hooks", "functorch", "ghost"]
AccountantName = Literal["prv", "rdp"]


@dataclass(frozen=True)
class DPSGDSettings:
    """The arguments of ``DPSGDDefense`` as given; :meth:`validate` refuses the ones DP-SGD cannot honour."""

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    steps: int | None = None
    max_epsilon: float | None = None
    accountant: AccountantName = "prv"
    noise_multiplicity: int = 1
    grad_sample_mode: GradSampleMode = "hooks"
    poisson_sampling: bool = True
    max_physical_batch_size: int | None = None
    gradient_canaries: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first argument that is out of range or that DP-SGD cannot honour."""
        self._validate_budget()
        self._validate_training()

    def _validate_budget(self) -> None:
        """Clipping bound, noise or target, delta and accountant."""
        if not self.max_grad_norm > 0:
            raise ValueError(f"dp_sgd max_grad_norm must be > 0, got {self.max_grad_norm}")
        sigma, target = self.noise_multiplier, self.target_epsilon
        if (sigma is None) == (target is None):
            raise ValueError(
                "dp_sgd needs exactly one of noise_multiplier and target_epsilon, got "
                f"noise_multiplier={sigma} and target_epsilon={target}; set "
                "target_epsilon (sigma is then planned for the run) or a fixed noise_multiplier"
            )
        if sigma is not None and not sigma > 0:
            raise ValueError(f"dp_sgd noise_multiplier must be > 0 (sigma=0 gives no privacy, epsilon=inf), got {sigma}")
        if target is not None and not target > 0:
            raise ValueError(f"dp_sgd target_epsilon must be > 0, got {target}")
        if self.max_epsilon is not None and (target is not None or not self.max_epsilon > 0):
            raise ValueError(
                f"dp_sgd max_epsilon={self.max_epsilon} needs a fixed noise_multiplier and must be > 0; "
                "with target_epsilon the target is the budget"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"dp_sgd delta must be in (0, 1), got {self.delta}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"dp_sgd steps must be >= 1, got {self.steps}")
        if self.accountant not in ("prv", "rdp"):
            raise ValueError(f"dp_sgd accountant must be 'prv' or 'rdp', got {self.accountant!r}")

    def _validate_training(self) -> None:
        """Noise multiplicity, per-sample gradient mode, sampling, physical batches and canaries."""
        k = self.noise_multiplicity
        if int(k) != k or k < 1:
            raise ValueError(f"dp_sgd noise_multiplicity must be an integer >= 1, got {k}")
        if self.grad_sample_mode == "ghost":
            raise ValueError(
                "dp_sgd grad_sample_mode='ghost' is not supported: Opacus's ghost clipping needs the "
                "per-row loss vector and two backward passes, and Lightning runs one loss.backward() on "
                "the mean loss; it would also clip each noise draw instead of each image when "
                "noise_multiplicity > 1. Use grad_sample_mode='hooks' (default) or 'functorch'"
            )
        if self.grad_sample_mode not in ("hooks", "functorch"):
            raise ValueError(
                f"dp_sgd grad_sample_mode must be 'hooks' or 'functorch', got {self.grad_sample_mode!r} "
                "(Opacus 'ew' fails on diffusers models)"
            )
        if not self.poisson_sampling:
            raise ValueError(
                "dp_sgd poisson_sampling=False is refused: the accountant's epsilon assumes Poisson "
                "sampling (each row joins each batch independently with probability q); shuffled "
                "fixed-size batches are not covered by it. Leave poisson_sampling: true"
            )
        if self.max_physical_batch_size is not None and self.max_physical_batch_size < 1:
            raise ValueError(f"dp_sgd max_physical_batch_size must be >= 1 or null, got {self.max_physical_batch_size}")
        if self.gradient_canaries < 0:
            raise ValueError(f"dp_sgd gradient_canaries must be >= 0, got {self.gradient_canaries}")
