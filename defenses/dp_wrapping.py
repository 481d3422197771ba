"""DP-SGD's model and optimizer, wrapped the way Opacus cuts them (Abadi et al. 2016, Algorithm 1).

A ``GradSampleModule`` computes each row's gradient during the backward pass; a ``DPOptimizer`` clips
each example's gradient to C, sums, adds Gaussian noise of standard deviation sigma * C, divides by
the expected batch size and steps. Both are privdiff's subclasses from :mod:`.per_sample_grads` (a
faster convolution rule, a backward pass that skips the discarded parameter gradients, clipping in
any memory layout); under DDP Opacus's ``DistributedDPOptimizer`` adds the noise once and sums the
clipped gradients of all processes.

What a diffusion model needs around them lives here: contiguous inputs for Opacus's convolution
rules (a diffusers attention block hands on channels-last tensors, after which the per-row
gradients come out exactly zero without an error), one set of hooks however often the trainer asks,
trainer settings refused that would void the clipping or the sampling, and noise multiplicity
(Dockhorn et al. 2023, DPDM, Sec. 3.2): an image's K per-row gradients averaged before clipping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from .per_sample_grads import ClippingDistributedDPOptimizer, ClippingDPOptimizer, FastGradSampleModule

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["PrivateTraining", "contiguous_inputs", "device_of", "per_image_gradients"]


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def contiguous_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: hand a convolution contiguous inputs.

    Opacus's ``unfold2d`` (``grad_sample_mode="hooks"``) assumes contiguous memory; the attention
    block of a diffusers UNet hands on channels-last tensors, and the per-sample gradients of the
    convolutions after it then come out exactly zero without any error. ``.contiguous()`` is a
    no-op for tensors that already are.
    """
    return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)


def per_image_gradients(model: nn.Module, noise_multiplicity: int) -> None:
    """Turn the per-row ``grad_sample`` of ``model``'s trainable parameters into per-image ones, in place.

    With K = ``noise_multiplicity`` > 1 the rows ``[i*K:(i+1)*K]`` belong to image i: their gradients
    are averaged (DPDM: average the K draws before clipping). Opacus's ``loss_reduction="mean"``
    scaled each row's gradient by the B*K rows of the batch, so a row holds the gradient of its own
    loss and the average is the gradient of the image's mean loss; the DPOptimizer then divides the
    clipped sum by the expected number of *images*. An empty Poisson batch (no backward ran) gets
    empty per-sample gradients, so the step adds noise only and is counted.
    """
    listed = model.listed_parameters() if isinstance(model, FastGradSampleModule) else model.parameters()
    params = [p for p in listed if p.requires_grad]
    samples = [getattr(p, "grad_sample", None) for p in params]
    present = [g for g in samples if g is not None]
    if any(isinstance(g, list) for g in present):
        raise ValueError("dp_sgd: per-sample gradients were accumulated over several backward passes; take one optimizer step per batch")
    # An empty Poisson batch: no backward ran (None), or Opacus's rules for 0 rows disagree.
    rows = 0 if not present or any(g.shape[0] == 0 for g in present) else present[0].shape[0]
    k = noise_multiplicity
    if rows % k:
        raise ValueError(f"dp_sgd: {rows} rows are not a multiple of noise_multiplicity={k}")
    for p, g in zip(params, samples):
        if g is None or rows == 0:  # empty batch, or a parameter the forward did not use
            p.grad_sample = p.new_zeros((rows // k, *p.shape))
        elif k > 1:
            p.grad_sample = g.view(rows // k, k, *g.shape[1:]).mean(1)


class PrivateTraining:
    """The Opacus wrappers of one run and the processes they serve.

    ``model`` is the ``GradSampleModule`` built (or handed in) last and ``optimizer`` the
    ``DPOptimizer``; ``rank`` is this process and ``world_size`` the number of DDP processes (1
    without DDP), both set by :meth:`check_trainer`.
    """

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.optimizer: DPOptimizer | None = None
        self.rank, self.world_size = 0, 1

    def check_trainer(self, trainer: "pl.Trainer", max_grad_norm: float) -> None:
        """Refuse trainer settings that would void per-image clipping or Poisson sampling; note the processes."""
        from lightning.pytorch.strategies import DDPStrategy

        if trainer.gradient_clip_val:
            raise ValueError(
                f"dp_sgd clips each image's gradient itself (max_grad_norm={max_grad_norm}); Lightning's "
                f"trainer.gradient_clip_val={trainer.gradient_clip_val} would clip the non-private gradient "
                "that DP-SGD then discards, i.e. be silently ignored. Remove trainer.gradient_clip_val"
            )
        if trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"dp_sgd cannot honour trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: "
                "accumulating Poisson batches changes the sample rate the accountant assumes. Raise "
                "data.batch_size instead, and set dp_sgd max_physical_batch_size to bound memory"
            )
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise ValueError(
                f"dp_sgd runs on one device or with DistributedDataParallel (trainer.strategy: ddp); got "
                f"{type(trainer.strategy).__name__} with world_size={trainer.world_size}. Opacus's per-sample "
                "gradients need whole (unsharded) parameters: use strategy ddp"
            )
        self.rank, self.world_size = int(trainer.global_rank), int(trainer.world_size)
        precision = str(trainer.precision)
        # bf16-mixed keeps the parameters, the clipped sums and the noise in float32 and the per-example norms
        # are taken in float32; 16-mixed scales the loss (the scaler would divide the noise by its scale) and
        # bf16-true would clip and noise in bf16.
        if not precision.startswith(("32", "64")) and precision != "bf16-mixed":
            raise ValueError(
                f"dp_sgd cannot keep its clipping bound and noise with trainer.precision={precision!r}. "
                "Set trainer.precision: 32-true, or bf16-mixed for mixed precision"
            )

    def wrap_model(self, model: nn.Module, grad_sample_mode: str, noise_multiplicity: int = 1) -> nn.Module:
        """``model`` in a ``FastGradSampleModule`` (``hooks`` or ``functorch`` rules), wrapped once only.

        With one row per image (``noise_multiplicity`` 1) the per-row gradients are the per-image ones
        and their norms are taken during the backward pass; with K > 1 rows they are averaged first.
        """
        if isinstance(model, AbstractGradSampleModule):
            self.model = model
            return model
        if self.model is not None and getattr(self.model, "_module", None) is model:
            return self.model  # wrapped before: one set of Opacus hooks only
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(
                f"dp_sgd cannot train this model privately: {errors}. Replace BatchNorm by GroupNorm "
                "(opacus.validators.ModuleValidator.fix does it) and other flagged layers as Opacus says"
            )
        if grad_sample_mode == "hooks":
            for module in model.modules():
                # Conv2d's rule (FastGradSampleModule) takes any memory layout; Opacus's 1d/3d ones don't.
                if isinstance(module, (nn.Conv1d, nn.Conv3d)) and not getattr(module, "_privdiff_contiguous", False):
                    module.register_forward_pre_hook(contiguous_inputs)
                    module._privdiff_contiguous = True
        wrapped = FastGradSampleModule(
            model, batch_first=True, loss_reduction="mean", strict=True,
            force_functorch=grad_sample_mode == "functorch",
        )
        wrapped.norms_in_backward = noise_multiplicity == 1
        # Poisson batches must not be accumulated: one backward per optimizer step.
        wrapped.forbid_grad_accumulation()
        self.model = wrapped
        return wrapped

    def wrap_optimizer(
        self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
        expected_batch_size: int, generator: torch.Generator, secure_mode: bool, step_hook: Callable[[DPOptimizer], None],
    ) -> DPOptimizer:
        """``optimizer`` in a (distributed) ``DPOptimizer`` that calls ``step_hook`` after each DP step.

        ``expected_batch_size`` counts images of the global batch, not B*K rows: each image's per-row
        gradients are averaged to one per-image gradient before clipping.
        """
        # Under DDP each process divides its clipped sum (plus, on rank 0, the noise) by its share
        # of the expected batch, and Opacus's DistributedDPOptimizer averages the processes: the
        # update is (sum of all clipped gradients + one noise draw) / expected_batch_size.
        distributed = self.world_size > 1
        dp_optimizer = (ClippingDistributedDPOptimizer if distributed else ClippingDPOptimizer)(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size / self.world_size if distributed else expected_batch_size,
            loss_reduction="mean",
            generator=generator,
            secure_mode=secure_mode,
        )
        dp_optimizer.attach_step_hook(step_hook)
        self.optimizer = dp_optimizer
        return dp_optimizer

    def backward_inputs(self, model: nn.Module) -> list[torch.Tensor] | None:
        """The layers' inputs to run backward to (the summed parameter gradients are discarded anyway), or None.

        One process only: under DDP the wrapper all-reduces parameter gradients during backward
        and waits for every one of them.
        """
        if self.world_size > 1 or not isinstance(model, FastGradSampleModule):
            return None
        return model.backward_inputs() or None
