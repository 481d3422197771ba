"""Per-example gradients for DP-SGD: Opacus's ``GradSampleModule`` made cheaper on the CPU.

Written here because Opacus (1.6) offers no alternative for these pieces. A profile of a stock-Opacus
DP step on a diffusers UNet (docs/benchmarks.md) shows its extra time going into unfolding convolution
inputs (im2col), zero-filling per-example buffers and the summed parameter gradients DP-SGD discards.
privdiff's pieces:

* ``CONV_RULES`` holds exact per-example weight-gradient rules for a convolution: the weight
  gradient of ONE grouped convolution with the batch folded into the channels (N groups: the
  library's weight-gradient kernel, no im2col), one batched product for a 1x1 convolution, one
  batched product per kernel offset on a *shifted view* of the padded input for a stride-1
  convolution (laid out channels-last once, never copied per offset; it returns a permuted view),
  and Opacus's im2col rule. ``FastestConvolutionRule`` tries the rules that apply on the first training
  steps of each layer shape and keeps the fastest (on the CPU): which one wins depends on the channels, the
  image size and the library's kernels. All are exactly the per-example gradient (tests compare each with
  Opacus's rule and with a loop of single-image backward passes). Each rule applies the loss
  reduction's batch-size factor where it costs least (an input, the product's own factor, the result).
  ``group_norm_per_example_grads`` folds the batch into a GroupNorm's channels the same way, so the
  library's fused GroupNorm backward yields every example's weight and bias gradient from the
  statistics the forward pass computed; ``linear_per_example_grads`` is Opacus's einsum as the
  product it is.
* ``FastGradSampleModule`` is a ``GradSampleModule`` with those rules; it takes each layer's output
  gradient with a hook on the output tensor (Opacus's full backward hooks add autograd nodes around
  every layer), stores a layer's per-example gradients directly when one backward pass produces
  them (Opacus first copies them into a zero-filled buffer meant for layers that run several times
  per pass), takes their per-example norms while they are in the cache, and ``backward_inputs`` lets the
  trainer's backward pass skip the summed parameter gradients DP-SGD discards.
* ``LayoutFreeClipping`` replaces ``DPOptimizer.clip_and_accumulate`` by the same computation (per
  example norm over all parameters, factor ``min(1, C / (norm + 1e-6))``, clipped sum) done in
  whatever memory order a per-example gradient lies: Opacus reshapes each one to (N, -1), which
  copies every non-contiguous gradient (a large share of the step with the permuted convolution gradients).
  It reads the norms taken during the backward pass, clips the small parameters as one block, draws
  the noise of all parameters in one call, divides the noised gradients by the batch size in one call,
  and reads each per-example gradient once a step (Opacus's ``pre_step`` reads them three times).

None of this changes what DP-SGD computes: the noise is Opacus's ``_generate_noise`` from the optimizer's
generator, and scaling and accounting stay Opacus's optimizer's.
"""

from __future__ import annotations

import math
import statistics
import time
from functools import partial
from typing import Any, Callable, Sequence

import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.grad_sample.grad_sample_module import create_or_accumulate_grad_sample, promote_current_grad_sample
from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN, RNNLinear
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed
from torch import nn

# Below this many input channels the im2col copy is small and one large product beats
# kernel_h * kernel_w thin ones (measured: 1 input channel 0.2x as fast with the shifted products).
MIN_SHIFTED_CHANNELS = 8
# The batch-as-groups weight gradient needs this many input and output channels per group to compete with
# the other rules (measured, batch 64: 16->16 at 16x16 1.05 ms against 1.7 ms shifted; 16->1 2.65 ms against
# 0.5 ms); below it, it is not even timed.
MIN_GROUPED_CHANNELS = 8
# Parameters up to this size are clipped together (one product over their concatenated per-example
# gradients): for them the per-call overhead exceeds the arithmetic.
SMALL_PARAMETER = 512


def _bmm(a: torch.Tensor, b: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * (a @ b)`` batched, the factor applied inside the product (no pass over the result)."""
    if scale == 1:
        return torch.bmm(a, b, out=out)
    if out is None:
        return torch.baddbmm(a.new_zeros(()), a, b, beta=0, alpha=scale)
    return torch.baddbmm(out, a, b, beta=0, alpha=scale, out=out)  # beta=0: out's old contents are not read


def _scale_smallest(
    x: torch.Tensor, backprops: torch.Tensor, result_numel: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """For a rule bilinear in ``x`` and ``backprops``: multiply whichever of the two inputs and the result is
    smallest by ``scale``; returns the inputs and the factor left for the result (1 when an input took it)."""
    if scale == 1:
        return x, backprops, 1.0
    smallest = min(x.numel(), backprops.numel(), result_numel)
    if x.numel() == smallest:
        return x * scale, backprops, 1.0
    if backprops.numel() == smallest:
        return x, backprops * scale, 1.0
    return x, backprops, scale


def accepts_scale(rule: Callable[..., Any]) -> bool:
    """Whether a grad-sampler rule takes ``scale=`` (the loss reduction's factor, applied where it costs least)."""
    return getattr(getattr(rule, "func", rule), "accepts_scale", False)  # getattr "func": a functools.partial


def _as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)  # Tensor.to is a dispatched call even when it returns x


def _scale_aware(rule: Callable[..., Any]) -> Callable[..., Any]:
    rule.accepts_scale = True  # type: ignore[attr-defined]
    return rule


def _uses_grouped_convolution(layer: nn.Conv2d, activations: torch.Tensor) -> bool:
    return (
        layer.groups == 1
        and isinstance(layer.padding, tuple)
        and layer.padding_mode == "zeros"
        and layer.kernel_size != (1, 1)  # the library runs a 1x1 grouped kernel group by group
        and min(activations.shape[1], layer.out_channels) >= MIN_GROUPED_CHANNELS
    )


def _is_pointwise(layer: nn.Conv2d) -> bool:
    return (
        layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid") and layer.groups == 1
    )


def grouped_conv2d_weight_grads(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-example weight gradients (N x C_out x C_in x kh x kw) of a convolution as ONE grouped convolution's weight gradient.

    The batch is folded into the channels: input (1, N*C_in, H, W), output gradient (1, N*C_out, H', W')
    and N groups, so group n's weight gradient is example n's (the per-example trick of Goodfellow 2015,
    "Efficient per-example gradient computations"). The library's weight-gradient kernel does the work:
    measured at about 1.1x the cost of the batch-summed weight gradient, against ~2x for shifted products.
    The result is multiplied by ``scale``.
    """
    n = x.shape[0]
    c_out, c_in, kh, kw = layer.weight.shape
    x, backprops, scale = _scale_smallest(x, backprops, n * layer.weight.numel(), scale)
    template = x.new_empty(n * c_out, c_in, kh, kw)  # only its shape and dtype are read
    grad = torch.ops.aten.convolution_backward(
        backprops.reshape(1, n * c_out, *backprops.shape[2:]), x.reshape(1, n * c_in, *x.shape[2:]), template,
        None, list(layer.stride), list(layer.padding), list(layer.dilation), False, [0, 0], n, [False, True, False],
    )[1]
    if scale != 1:
        grad.mul_(scale)
    return grad.view(n, c_out, c_in, kh, kw)


@_scale_aware
def group_norm_per_example_grads(
    layer: nn.GroupNorm, activations: Sequence[torch.Tensor], backprops: torch.Tensor, scale: float = 1.0
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of a ``GroupNorm``'s weight and bias (an Opacus grad-sampler rule).

    The batch is folded into the channels, (1, N*C, ...) with N*G groups: the same groups as the layer's,
    so the library's GroupNorm backward yields each example's weight and bias gradient (N*C of them) in one
    fused pass, where Opacus's rule normalises, multiplies and sums in separate passes. ``activations`` is
    ``[input]``, or ``[input, mean, rstd]`` with the forward pass's group statistics (N x G), which are then
    not computed again. The gradients are multiplied by ``scale``.
    """
    x = _as_dtype(activations[0], backprops.dtype)
    n, c = x.shape[:2]
    wants = [False, layer.weight is not None and layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad]
    if n == 0 or not any(wants):
        return compute_group_norm_grad_sample(layer, [x], backprops * scale)
    folded = x.reshape(1, n * c, -1)
    size, groups = folded.shape[-1], n * layer.num_groups
    if len(activations) == 3 and activations[1].dtype == x.dtype:  # the forward's statistics (see capture_group_norm_statistics)
        mean, rstd = activations[1].reshape(1, groups), activations[2].reshape(1, groups)
    else:
        _, mean, rstd = torch.ops.aten.native_group_norm(folded, None, None, 1, n * c, size, groups, layer.eps)
    _, weight, bias = torch.ops.aten.native_group_norm_backward(
        backprops.reshape(1, n * c, size), folded, mean, rstd, None, 1, n * c, size, groups, wants
    )
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if wants[1]:
        grads[layer.weight] = weight.view(n, c) if scale == 1 else weight.view(n, c).mul_(scale)
    if wants[2]:
        grads[layer.bias] = bias.view(n, c) if scale == 1 else bias.view(n, c).mul_(scale)
    return grads


@_scale_aware
def linear_per_example_grads(
    layer: nn.Linear, activations: Sequence[torch.Tensor], backprops: torch.Tensor, scale: float = 1.0
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of a ``Linear``'s weight and bias (an Opacus grad-sampler rule): Opacus's
    einsum written as the product it is (an outer product per example for (N, C) inputs, one batched
    product for (N, ..., C)), which skips einsum's dispatch (measured: 20-50 us of ~100 a call). The
    gradients are multiplied by ``scale``."""
    x = _as_dtype(activations[0], backprops.dtype)
    grads: dict[nn.Parameter, torch.Tensor] = {}
    n = x.shape[0]
    has_bias = layer.bias is not None and layer.bias.requires_grad
    if x.dim() == 2:
        if layer.weight.requires_grad:
            scaled_x, scaled_b, _ = _scale_smallest(x, backprops, math.inf, scale)  # an input is always smaller
            grads[layer.weight] = scaled_b.unsqueeze(2) * scaled_x.unsqueeze(1)
        if has_bias:  # a new tensor either way: the gradient autograd hands on is not ours to keep
            grads[layer.bias] = backprops.clone() if scale == 1 else backprops * scale
        return grads
    g = backprops.reshape(n, -1, backprops.shape[-1])
    if layer.weight.requires_grad:
        grads[layer.weight] = _bmm(g.transpose(1, 2), x.reshape(n, -1, x.shape[-1]), scale)
    if has_bias:
        grads[layer.bias] = g.sum(1) if scale == 1 else g.sum(1).mul_(scale)
    return grads


def _uses_shifted_products(layer: nn.Conv2d, activations: torch.Tensor) -> bool:
    return (
        layer.stride == (1, 1)
        and layer.dilation == (1, 1)
        and layer.groups == 1
        and isinstance(layer.padding, tuple)
        and layer.padding_mode == "zeros"
        and activations.shape[1] >= MIN_SHIFTED_CHANNELS
    )


def _pointwise_rule(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """A 1x1 convolution's per-example weight gradients (times ``scale``): it is a linear map of each pixel,
    one batched product."""
    n, c_in = x.shape[:2]
    weight = _bmm(backprops.reshape(n, layer.out_channels, -1), x.reshape(n, c_in, -1).transpose(1, 2), scale)
    return weight.view(n, layer.out_channels, c_in, 1, 1)


def _shifted_rule(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-example weight gradients of a stride-1 convolution as one batched product per kernel offset.

    The gradient of example n at offset (i, j) is ``G[n, :, :, i, j] = g_n @ x_n[rows shifted by (i, j)]``
    with ``g_n`` the output gradient (C_out x H_out*W_pad) and ``x_n`` the zero-padded input laid out as
    (H_pad*W_pad) x C_in rows. Taking the output gradient over the padded width (its extra columns are
    zero) makes every shifted window one contiguous run of rows, so each offset is a single batched
    product on a view of the same buffer. Returns a permuted view, times ``scale``.
    """
    n, c_in, h, w = x.shape
    c_out = backprops.shape[1]
    (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
    h_pad, w_pad = h + 2 * ph, w + 2 * pw
    h_out, w_out = h_pad - kh + 1, w_pad - kw + 1
    rows = h_out * w_pad
    # kw - 1 zero rows at the end keep the last offset's window inside the buffer.
    padded = x.new_zeros(n, h_pad * w_pad + kw - 1, c_in)
    padded[:, : h_pad * w_pad].view(n, h_pad, w_pad, c_in)[:, ph : ph + h, pw : pw + w] = x.permute(0, 2, 3, 1)
    if w_out == w_pad:
        grad_out = backprops.reshape(n, c_out, rows)
    else:
        grad_out = backprops.new_zeros(n, c_out, h_out, w_pad)
        grad_out[..., :w_out] = backprops
        grad_out = grad_out.view(n, c_out, rows)
    per_offset = backprops.new_empty(kh * kw, n, c_out, c_in)
    for i in range(kh):
        for j in range(kw):
            start = i * w_pad + j
            _bmm(grad_out, padded[:, start : start + rows], scale, out=per_offset[i * kw + j])
    return per_offset.permute(1, 2, 3, 0).reshape(n, c_out, c_in, kh, kw)


def _unfold_rule(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Opacus's rule (im2col, then one batched product), times ``scale``; its unfold assumes contiguous
    memory (a channels-last input gives zero gradients)."""
    x, backprops, scale = _scale_smallest(x, backprops, x.shape[0] * layer.weight.numel(), scale)
    grad = compute_conv_grad_sample(layer, [x.contiguous()], backprops)[layer.weight]
    return grad if scale == 1 else grad * scale


# The exact per-example weight-gradient rules for a convolution, by name; ``conv_rules`` says which apply.
CONV_RULES: dict[str, Callable[[nn.Conv2d, torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "pointwise": _pointwise_rule,
    "grouped": grouped_conv2d_weight_grads,
    "shifted": _shifted_rule,
    "unfold": _unfold_rule,
}


def conv_rules(layer: nn.Conv2d, x: torch.Tensor) -> list[str]:
    """The rules of ``CONV_RULES`` that compute ``layer``'s per-example weight gradients for input ``x``,
    the one the channel counts suggest first (a 1x1 convolution has only one worth running)."""
    if _is_pointwise(layer):
        return ["pointwise"]
    rules = ["unfold"]
    if _uses_shifted_products(layer, x):
        rules.insert(0, "shifted")
    if _uses_grouped_convolution(layer, x):
        rules.insert(0, "grouped")
    return rules


@_scale_aware
def conv2d_per_example_grads(
    layer: nn.Conv2d, activations: Sequence[torch.Tensor], backprops: torch.Tensor, rule: str | None = None,
    scale: float = 1.0,
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of a ``Conv2d``'s weight and bias (an Opacus grad-sampler rule).

    The weight's come from ``CONV_RULES[rule]``, by default the first of ``conv_rules``: with enough
    channels :func:`grouped_conv2d_weight_grads`, for a 1x1 convolution one batched product, for a
    stride-1 convolution with few output channels one product per kernel offset, otherwise Opacus's.

    Args:
        layer: the convolution.
        activations: ``[input]`` as the forward pass saw it (N x C_in x H x W).
        backprops: the gradient of the loss with respect to the output (N x C_out x H_out x W_out);
            the rule is linear in it, so the loss reduction's factor may be applied before or after.
        rule: a name of ``CONV_RULES`` that applies to this layer (see ``conv_rules``).
        scale: a factor for the gradients (the loss reduction's), applied where it costs least.
    """
    x = _as_dtype(activations[0], backprops.dtype)
    if x.shape[0] == 0:
        return compute_conv_grad_sample(layer, [x.contiguous()], backprops)
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        grads[layer.weight] = CONV_RULES[rule or conv_rules(layer, x)[0]](layer, x, backprops, scale)
    if layer.bias is not None and layer.bias.requires_grad:
        bias = backprops.sum(dim=(2, 3))
        grads[layer.bias] = bias if scale == 1 else bias.mul_(scale)
    return grads


class FastestConvolutionRule:
    """An Opacus grad-sampler rule for ``Conv2d`` that runs, for each layer shape, the fastest of the
    rules that apply, timed inside the training steps (what ``cudnn.benchmark`` does for kernels); on
    other devices than the CPU, the first of ``conv_rules``.

    The first calls of a shape try the rules in turn, each ``repeats + 1`` times (its first call, with
    the library's one-time setup, is not counted), and the rule with the lowest median time is kept.
    These calls are real: every rule is exact, so the trials change only rounding. Timing them in
    the step, where the layer's input comes from memory rather than from the cache, matters: which rule
    wins depends on the channels, the image size, the library's kernels and the state of the caches,
    and no count of channels predicts it (measured on the quickstart UNet at batch 64: grouped 6.5 ms
    against shifted 2.4 ms on fresh tensors of a 64 -> 32 channel 8x8 layer, 2.3 against 2.3 inside a
    step; repeated calls on the same tensors picked shifted for 8x8 layers where grouped was 1.2-1.4x
    faster inside the step). Shapes are keyed with the batch size rounded up to a power of two, so
    Poisson batches of varying size reuse the choice.
    """

    accepts_scale = True

    def __init__(self, repeats: int = 3) -> None:
        self.repeats = repeats
        self.chosen: dict[tuple[Any, ...], str] = {}
        self._trials: dict[tuple[Any, ...], dict[str, list[float]]] = {}

    def __call__(
        self, layer: nn.Conv2d, activations: Sequence[torch.Tensor], backprops: torch.Tensor, scale: float = 1.0
    ) -> dict[nn.Parameter, torch.Tensor]:
        x = _as_dtype(activations[0], backprops.dtype)
        if x.shape[0] == 0 or not layer.weight.requires_grad:
            return conv2d_per_example_grads(layer, [x], backprops, scale=scale)
        key = (x.device, x.dtype, tuple(x.shape[1:]), 1 << (x.shape[0] - 1).bit_length(), layer.weight.shape,
               layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode)
        rule = self.chosen.get(key)
        if rule is not None:
            return conv2d_per_example_grads(layer, [x], backprops, rule, scale)
        rules = conv_rules(layer, x)
        # Timed on the CPU only, where it was measured: on a GPU the grouped kernel's algorithm is cuDNN's
        # choice, and the im2col rule there would allocate its unfolded input (GBs at batch 256).
        if len(rules) == 1 or x.device.type != "cpu":
            self.chosen[key] = rules[0]
            return conv2d_per_example_grads(layer, [x], backprops, rules[0], scale)
        trials = self._trials.setdefault(key, {name: [] for name in rules})
        name = min(rules, key=lambda r: len(trials[r]))  # the rule tried least so far
        start = time.perf_counter()
        grads = conv2d_per_example_grads(layer, [x], backprops, name, scale)
        trials[name].append(time.perf_counter() - start)
        if all(len(times) > self.repeats for times in trials.values()):
            self.chosen[key] = min(rules, key=lambda r: statistics.median(trials[r][1:]))
            del self._trials[key]
        return grads


class FastGradSampleModule(GradSampleModule):
    """Opacus's ``GradSampleModule`` with ``conv2d_per_example_grads``, output-tensor gradient hooks,
    no zero-filled copy per layer, and ``backward_inputs`` for a backward pass without parameter gradients.

    Same arguments as ``GradSampleModule``; ``p.grad_sample`` holds the same values. Every layer with
    trainable parameters must return one tensor (all layers of a diffusers ``UNet2DModel`` do).
    """

    GRAD_SAMPLERS = {
        **GradSampleModule.GRAD_SAMPLERS, nn.Conv2d: conv2d_per_example_grads, nn.GroupNorm: group_norm_per_example_grads,
        nn.Linear: linear_per_example_grads,
    }
    # Each parameter's per-example norms are taken as soon as its per-example gradient is complete,
    # while it is still in the cache (``cache_example_norms``); the clipping reads them. Turn off where
    # the per-example gradients are changed before clipping anyway (DPDM's averaging of K rows per image).
    norms_in_backward = True

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True, force_functorch: bool = False) -> None:
        """Opacus's hooks, with the output gradient taken by a hook on each layer's output tensor.

        Opacus registers a full backward hook per layer, which wraps the layer's inputs and outputs
        in extra autograd nodes and runs after the input gradients; a gradient hook on the output
        (registered by the forward hook) receives the same output gradient with less work
        (measured: ~19 ms of Python and autograd overhead in a ~230 ms DP step of the quickstart UNet).
        The same forward hook lists what ``backward_inputs`` returns.
        """
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        # This module's own rule table: the convolution rule keeps the choices it timed for this model.
        self.GRAD_SAMPLERS = {**self.GRAD_SAMPLERS, nn.Conv2d: FastestConvolutionRule()}
        # Each hooked layer's parameters (Opacus's trainable_parameters, whose requires_grad the hooks
        # still read at every call): listing them with Module.parameters() took ~5 ms of a quickstart DP step.
        self._layer_parameters: dict[nn.Module, tuple[nn.Parameter, ...]] = {}
        for layer in self.iterate_submodules(self._module):
            if type(layer) in (DPRNN, DPLSTM, DPGRU):  # their RNNLinear layers carry the hooks (as Opacus)
                continue
            self._layer_parameters[layer] = tuple(layer.parameters())
            if force_functorch or self._get_module_type(layer) not in self.GRAD_SAMPLERS:
                prepare_layer(layer, batch_first=batch_first)
            hook = partial(self._capture_forward, loss_reduction=loss_reduction, batch_first=batch_first)
            self.autograd_grad_sample_hooks.append(layer.register_forward_hook(hook))
        self._backward_targets: list[torch.Tensor] = []
        self._all_parameters = tuple(self._module.parameters())
        self.enable_hooks()

    def listed_parameters(self) -> tuple[nn.Parameter, ...]:
        """The wrapped module's parameters as ``parameters()`` lists them, listed once when the hooks were added
        (``parameters()`` walks every submodule, at every step where it is called)."""
        return self._all_parameters

    def _capture_forward(
        self, layer: nn.Module, inputs: tuple[Any, ...], output: Any, *, loss_reduction: str, batch_first: bool
    ) -> None:
        # Opacus's capture_activations_hook (opacus 1.6), with the layer's trainable parameters listed once.
        if not (self.hooks_enabled and layer.training and torch.is_grad_enabled()):
            return
        params = [p for p in self._layer_parameters[layer] if p.requires_grad]
        if not params:
            return
        if not (torch.is_tensor(output) and output.requires_grad):
            raise ValueError(
                f"dp_sgd: layer {type(layer).__name__} returned {type(output).__name__}; privdiff's per-example "
                "gradients need layers with trainable parameters to return one tensor that requires grad"
            )
        if not any(torch.is_tensor(t) and t.requires_grad for t in inputs):
            # No gradient flows back through this layer's inputs (the noisy image at the first convolution,
            # the sinusoidal timestep features, an Embedding's indices): backward must reach its output.
            self._backward_targets.append(output)
        if not hasattr(layer, "activations"):
            layer.activations = []
        layer.activations.append([t.detach() for t in inputs] + _group_norm_statistics(layer, output))
        for p in params:
            p._forward_counter += 1

        def on_output_grad(grad: torch.Tensor) -> None:
            self.capture_backprops_hook(layer, None, (grad,), loss_reduction, batch_first)

        output.register_hook(on_output_grad)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._backward_targets = []
        return super().forward(*args, **kwargs)

    def backward_inputs(self) -> list[torch.Tensor]:
        """The tensors ``loss.backward(inputs=...)`` must reach after this module's last forward pass.

        DP-SGD discards the summed parameter gradients autograd computes (the optimizer replaces
        them by the clipped, noised sum of per-example gradients). These are the outputs of the layers
        no gradient reaches through their inputs; every other hooked layer lies between the loss and one of
        them, so backward to them computes every gradient the per-example rules need -- with respect to
        each layer's output -- and skips the parameters' own (measured: about a fifth of a DP step on the
        quickstart UNet). Autograd keeps their gradients in ``.grad`` until the next forward pass.
        """
        return list(self._backward_targets)

    def capture_backprops_hook(
        self,
        module: nn.Module,
        _forward_input: torch.Tensor,
        forward_output: torch.Tensor,
        loss_reduction: str,
        batch_first: bool,
    ) -> None:
        # Opacus's hook (opacus 1.6 GradSampleModule.capture_backprops_hook and rearrange_grad_samples),
        # except that the first per-example gradient of a parameter in a backward pass is stored as it is
        # when it covers the whole batch, instead of being copied into a new zero-filled buffer, and that
        # the batch-size factor of loss_reduction="mean" is applied where it costs least: privdiff's rules
        # take it as an argument, for others it multiplies the output gradient or the per-example gradients,
        # whichever is smaller (every rule is linear in the output gradient). The layer's bookkeeping
        # (activations, max_batch_len) is read from its __dict__: through nn.Module's attribute methods a
        # miss or a delete costs microseconds, ~90 layers a step.
        if not self.hooks_enabled:
            return
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction = {loss_reduction}. Only 'sum' and 'mean' losses are supported")
        state = module.__dict__
        if not batch_first or type(module) is RNNLinear:  # a batch dimension to move first: Opacus's code
            activations, backprops = self.rearrange_grad_samples(
                module=module, backprops=forward_output[0].detach(), loss_reduction="sum", batch_first=batch_first
            )
        else:
            if "activations" not in state:
                raise ValueError(f"No activations detected for {type(module)}, run forward after add_hooks(model)")
            if "max_batch_len" not in state:
                state["max_batch_len"] = max(a[-1].shape[0] for a in state["activations"])
            activations, backprops = state["activations"].pop(), forward_output[0].detach()
        max_batch_len = state["max_batch_len"]
        params = [p for p in self._layer_parameters[module] if p.requires_grad]
        scale = max_batch_len if loss_reduction == "mean" else 1
        rule = None if self.force_functorch else self.GRAD_SAMPLERS.get(self._get_module_type(module))
        if rule is not None and accepts_scale(rule):
            grad_samples, scale = rule(module, activations, backprops, scale=scale), 1
        else:
            if scale != 1 and backprops.numel() <= max_batch_len * sum(p.numel() for p in params):
                backprops, scale = backprops * scale, 1
            grad_samples = (rule or ft_compute_per_sample_gradient)(module, activations, backprops)
        for param, grad_sample in grad_samples.items():
            if not param.requires_grad:
                continue
            if scale != 1:
                grad_sample = grad_sample * scale
            current = getattr(param, "_current_grad_sample", None)
            if current is None and grad_sample.shape[0] == max_batch_len:
                param._current_grad_sample = grad_sample
            elif current is None:
                create_or_accumulate_grad_sample(param=param, grad_sample=grad_sample, max_batch_len=max_batch_len)
            else:  # a layer run twice in one pass: add out of place (the stored tensor may be a view)
                total = current.clone()
                total[: grad_sample.shape[0]] += grad_sample
                param._current_grad_sample = total
        for p in params:
            p._forward_counter -= 1
            if p._forward_counter == 0:
                promote_current_grad_sample(p)
                if self.norms_in_backward and p.numel() > SMALL_PARAMETER and torch.is_tensor(p.grad_sample):
                    cache_example_norms(p.grad_sample)
            if not self.grad_accumulation_allowed and isinstance(p.grad_sample, list) and len(p.grad_sample) > 1:
                raise ValueError(
                    "Poisson sampling is not compatible with grad accumulation. You need to call "
                    "optimizer.step() after every forward/backward pass or consider using BatchMemoryManager"
                )
        if not state["activations"]:
            del state["max_batch_len"]


def _group_norm_statistics(layer: nn.Module, output: torch.Tensor) -> list[torch.Tensor]:
    """``[mean, rstd]`` (N x G) that a ``GroupNorm``'s forward pass computed and autograd saved for its
    backward, for ``group_norm_per_example_grads``; ``[]`` for other layers or where autograd saved none."""
    node = output.grad_fn
    if type(layer) is not nn.GroupNorm or node is None or type(node).__name__ != "NativeGroupNormBackward0":
        return []
    return [node._saved_result1, node._saved_result2]


def _dense_view(grad_sample: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``grad_sample`` permuted into its memory order (a contiguous view), and the permutation.

    A tensor that is not a permutation of one dense block (a slice, an expanded view) is copied.
    """
    order = sorted(range(grad_sample.dim()), key=lambda d: (-grad_sample.stride(d), d))
    dense = grad_sample.permute(order)
    if dense.is_contiguous():
        return dense, order
    return grad_sample.contiguous(), list(range(grad_sample.dim()))


def _as_lead_example_rest(grad_sample: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """A (lead, N, rest) view of a per-example gradient in its memory order, and the order of the
    parameter's dimensions in (lead, rest)."""
    dense, order = _dense_view(grad_sample)
    at = order.index(0)
    view = dense.reshape(math.prod(dense.shape[:at]), grad_sample.shape[0], math.prod(dense.shape[at + 1 :]))
    return view, [d - 1 for d in order if d != 0]


def _example_norms(grad_sample: torch.Tensor) -> torch.Tensor:
    """The l2 norm of each example's gradient of one parameter (N,), in whatever memory order it lies.

    Accumulated and returned in at least float32: a bf16 norm (mixed precision) is off by up to 2^-9 of
    itself, and a clipping factor taken from a norm rounded down lets an example's update exceed the bound.
    """
    dtype = grad_sample.dtype
    if dtype not in (torch.float32, torch.float64):  # promote_types is a dispatched call: skipped for the usual case
        dtype = torch.promote_types(dtype, torch.float32)
    if grad_sample.is_contiguous():  # most: no layout to find
        flat = grad_sample.view(grad_sample.shape[0], math.prod(grad_sample.shape[1:]))
        return torch.linalg.vector_norm(flat, dim=1, dtype=dtype)
    # Per (lead, example) first, then over the lead: two contiguous reductions (a norm over dims (0, 2) at
    # once is a strided reduction, measured 7x slower on a (9, 64, 1024) view).
    return torch.linalg.vector_norm(torch.linalg.vector_norm(_as_lead_example_rest(grad_sample)[0], dim=2, dtype=dtype), dim=0)


def cache_example_norms(grad_sample: torch.Tensor) -> None:
    """Compute ``grad_sample``'s per-example norms now and keep them on the tensor for ``per_example_norms``.

    Taken right after a layer's per-example gradients are formed (in the backward hook), the norm
    reads them from the cache instead of from memory at clipping time. The norms are stored with the
    tensor's version counter: an in-place change of the tensor (or of what it views) afterwards makes
    ``per_example_norms`` compute them again, and a new tensor (DPDM's per-image average) has none.
    """
    grad_sample._privdiff_example_norms = (grad_sample._version, _example_norms(grad_sample))


def _stored_or_computed_norms(grad_sample: torch.Tensor) -> torch.Tensor:
    stored = getattr(grad_sample, "_privdiff_example_norms", None)
    if stored is not None and stored[0] == grad_sample._version:
        return stored[1]
    return _example_norms(grad_sample)


def per_example_norms(grad_samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """The l2 norm of each example's whole gradient over the given per-example gradients (N,).

    A parameter's norms kept by ``cache_example_norms`` (and still valid) are used as they are:
    the same computation, done earlier.
    """
    return torch.stack([_stored_or_computed_norms(g) for g in grad_samples], dim=1).norm(2, dim=1)


def _example_block(grad_samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several contiguous per-example gradients side by side, (N, total size): one example per row."""
    n = grad_samples[0].shape[0]
    return torch.cat([g.view(n, math.prod(g.shape[1:])) for g in grad_samples], dim=1)


def weighted_example_sum(grad_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_n weights[n] * grad_sample[n]``, contiguous in the parameter's shape, without copying ``grad_sample``."""
    weights = _as_dtype(weights, grad_sample.dtype)
    if grad_sample.is_contiguous():  # most: one product, no layout to find
        flat = grad_sample.view(grad_sample.shape[0], math.prod(grad_sample.shape[1:]))
        return torch.mv(flat.t(), weights).view(grad_sample.shape[1:])
    view, dims = _as_lead_example_rest(grad_sample)
    total = torch.matmul(weights, view)  # (lead, rest)
    shape = grad_sample.shape[1:]
    total = total.reshape([shape[d] for d in dims])
    return total.permute([dims.index(d) for d in range(len(dims))]).contiguous()


class LayoutFreeClipping:
    """``DPOptimizer.clip_and_accumulate`` without copying non-contiguous per-example gradients, and
    ``scale_grad`` in time linear in the number of parameters.

    Mixed into Opacus's ``DPOptimizer`` and ``DistributedDPOptimizer`` (before them): the same
    per-example clipping factor ``min(1, max_grad_norm / (norm + 1e-6))`` as Opacus 1.6, the same
    clipped sum in ``p.summed_grad`` and the same division of ``p.grad`` by the expected batch size.
    """

    def add_clipped_sum_hook(self, hook: Callable[[Any], None]) -> None:
        """Call ``hook(optimizer)`` once every clipped sum is in ``p.summed_grad``, before the noise: where a
        white-box audit adds its gradient canaries (``defenses.gradient_canaries``), as a sampled example's enters."""
        self.__dict__.setdefault("clipped_sum_hooks", []).append(hook)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Opacus's ``zero_grad`` (``p.grad_sample`` and ``p.summed_grad`` always to None) with torch's default
        for ``p.grad``, None: Opacus defaults to zero-filling each ``p.grad`` (one call per parameter), which
        the next step replaces anyway, and Lightning passes no argument."""
        super().zero_grad(set_to_none)

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        # Opacus 1.6's DPOptimizer.pre_step, reading each parameter's per-example gradient once: Opacus's
        # reads ``self.grad_samples`` (a Python loop over the parameters) twice before clipping reads it again.
        if not self.params:  # no trainable parameter: a plain optimizer step, as Opacus's
            return True
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def clip_and_accumulate(self) -> None:
        self._grad_buffers = None  # set again by add_noise_to_all, for scale_grad
        params = self.params
        for p in params:
            _check_processed_flag(p.grad_sample)
        grad_samples = [self._get_flat_grad_sample(p) for p in params]
        # Biases, norms and small linear layers are clipped as one block per device and dtype: their
        # per-example norms and weighted sums are one call each over the concatenated gradients.
        small: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, (p, grad_sample) in enumerate(zip(params, grad_samples)):
            if p.summed_grad is None and grad_sample.is_contiguous() and p.numel() <= SMALL_PARAMETER and grad_sample.dtype == p.dtype:
                small.setdefault((grad_sample.device, grad_sample.dtype), []).append(i)
        in_blocks = {i for group in small.values() for i in group}
        blocks = {key: _example_block([grad_samples[i] for i in group]) for key, group in small.items()}
        if len(grad_samples[0]) == 0:  # an empty Poisson batch
            factors = torch.zeros((0,), device=grad_samples[0].device)
        else:
            parts = [_stored_or_computed_norms(g) for i, g in enumerate(grad_samples) if i not in in_blocks]
            parts += [torch.linalg.vector_norm(block, dim=1).to(grad_samples[0].device) for block in blocks.values()]
            norms = torch.stack(parts, dim=1).norm(2, dim=1)
            factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        weights: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        for i, (p, grad_sample) in enumerate(zip(params, grad_samples)):
            if i in in_blocks:
                continue
            if grad_sample.dtype != p.dtype:
                grad_sample = grad_sample.to(p.dtype)
            key = (grad_sample.device, grad_sample.dtype)
            if key not in weights:
                weights[key] = factors.to(*key)
            grad = weighted_example_sum(grad_sample, weights[key])
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
        for key, group in small.items():
            totals = torch.mv(blocks[key].t(), factors.to(*key))
            for i, total in zip(group, totals.split([params[i].numel() for i in group])):
                params[i].summed_grad = total.view(params[i].shape)
        for p in params:
            _mark_as_processed(p.grad_sample)
        for hook in getattr(self, "clipped_sum_hooks", ()):
            hook(self)

    def add_noise_to_all(self) -> None:
        """Opacus 1.6's ``DPOptimizer.add_noise`` with one draw per device and dtype instead of one per parameter.

        Opacus calls ``_generate_noise`` once per parameter (~180 calls a step on the quickstart UNet,
        each allocating a zero tensor first). The same i.i.d. Gaussian noise of standard deviation
        ``noise_multiplier * max_grad_norm``, from the same generator and with the same ``secure_mode``,
        is drawn here over the concatenated clipped sums; each ``p.grad`` is a view of that buffer.
        """
        groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            groups.setdefault((p.summed_grad.device, p.summed_grad.dtype), []).append(p)
        self._grad_buffers = []
        for group in groups.values():
            total = torch.cat([p.summed_grad.reshape(-1) for p in group])
            total += _generate_noise(std=self.noise_multiplier * self.max_grad_norm, reference=total,
                                     generator=self.generator, secure_mode=self.secure_mode)
            for p, grad in zip(group, total.split([p.numel() for p in group])):
                p.grad = grad.view_as(p)
                _mark_as_processed(p.summed_grad)
            self._grad_buffers.append(total)

    def scale_grad(self) -> None:
        # Opacus 1.6's DPOptimizer.scale_grad reads ``self.accumulated_iterations`` (a loop over every
        # parameter) once per parameter: quadratic in their number (~6 ms of a DP step of the quickstart
        # UNet, 182 parameters). The same division with the count read once, in one call.
        # When every p.grad is a view of the buffers add_noise_to_all just filled, one division per buffer.
        buffers, self._grad_buffers = getattr(self, "_grad_buffers", None), None
        if self.loss_reduction == "mean":
            denominator = self.expected_batch_size * self.accumulated_iterations
            if buffers is not None:
                for buffer in buffers:
                    buffer.div_(denominator)
            else:
                torch._foreach_div_([p.grad for p in self.params], denominator)


class ClippingDPOptimizer(LayoutFreeClipping, DPOptimizer):
    """Opacus's ``DPOptimizer`` with ``LayoutFreeClipping``."""

    def add_noise(self) -> None:
        self.add_noise_to_all()


class ClippingDistributedDPOptimizer(LayoutFreeClipping, DistributedDPOptimizer):
    """Opacus's ``DistributedDPOptimizer`` with ``LayoutFreeClipping``."""

    def add_noise(self) -> None:
        # Opacus's DistributedDPOptimizer.add_noise: the noise is added by the first process only.
        if self.rank == 0:
            self.add_noise_to_all()
        else:
            self._grad_buffers = None
            for p in self.params:
                p.grad = p.summed_grad.view_as(p)
