"""privdiff's per-example gradient rule for convolutions and its layout-free clipping equal Opacus's."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.optimizers import DPOptimizer
from torch import nn

from privdiff.defenses.per_sample_grads import (
    CONV_RULES,
    SMALL_PARAMETER,
    ClippingDPOptimizer,
    FastestConvolutionRule,
    _is_pointwise,
    _uses_grouped_convolution,
    _uses_shifted_products,
    conv2d_per_example_grads,
    conv_rules,
    per_example_norms,
    weighted_example_sum,
)


def loop_reference(layer: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's weight and bias gradient from its own backward pass (loss <g_n, conv(x_n)>)."""
    weights, biases = [], []
    for n in range(x.shape[0]):
        layer.zero_grad()
        (layer(x[n : n + 1]) * g[n : n + 1]).sum().backward()
        weights.append(layer.weight.grad.clone())
        biases.append(layer.bias.grad.clone())
    return torch.stack(weights), torch.stack(biases)


@pytest.mark.parametrize(
    "c_in,c_out,size,kernel,padding,stride,rule,dilation",
    [
        (8, 16, 8, 3, 1, 1, "grouped", 1),
        (16, 8, 7, 3, 1, 1, "grouped", 1),  # odd size
        (8, 8, 6, 1, 0, 1, "pointwise", 1),  # 1x1 shortcut
        (8, 8, 9, 3, 0, 1, "grouped", 1),  # no padding
        (8, 8, 8, (3, 5), (1, 2), 1, "grouped", 1),  # rectangular kernel and padding
        (8, 8, 8, 3, 1, 2, "grouped", 1),  # strided (downsampling)
        (16, 8, 8, 3, 2, 1, "grouped", 2),  # dilated
        (8, 4, 9, 3, 0, 1, "shifted", 1),  # few output channels, no padding: output narrower than the padded width
        (8, 4, 8, (3, 5), (1, 2), 1, "shifted", 1),  # rectangular kernel and padding
        (8, 4, 8, 3, 1, 2, "opacus", 1),  # strided, few output channels: Opacus's rule
        (1, 8, 8, 3, 1, 1, "opacus", 1),  # one input channel: Opacus's rule
    ],
)
def test_convolution_rule_equals_a_loop_of_single_image_gradients(c_in, c_out, size, kernel, padding, stride, rule, dilation) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(c_in, c_out, kernel, padding=padding, stride=stride, dilation=dilation)
    x = torch.randn(5, c_in, size, size)
    g = torch.randn_like(layer(x))
    chosen = ("pointwise" if _is_pointwise(layer) else "grouped" if _uses_grouped_convolution(layer, x)
              else "shifted" if _uses_shifted_products(layer, x) else "unfold")
    assert conv_rules(layer, x)[0] == chosen == rule.replace("opacus", "unfold")
    weight, bias = loop_reference(layer, x, g)
    fastest = FastestConvolutionRule(repeats=1)
    for memory_format in (torch.contiguous_format, torch.channels_last):  # attention blocks hand on channels-last
        xx = x.to(memory_format=memory_format)
        # every rule the layer admits (the fastest is chosen at run time), and the run-time choice
        outs = [conv2d_per_example_grads(layer, [xx], g, rule=name) for name in conv_rules(layer, x)] + [fastest(layer, [xx], g)]
        for out in outs:
            torch.testing.assert_close(out[layer.weight], weight, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out[layer.bias], bias, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out[layer.weight], compute_conv_grad_sample(layer, [x], g)[layer.weight], atol=1e-5, rtol=1e-4)
        # the loss reduction's factor, which each rule applies where it costs least (an input, in the product, the result)
        for name in conv_rules(layer, x):
            out = conv2d_per_example_grads(layer, [xx], g, rule=name, scale=64.0)
            torch.testing.assert_close(out[layer.weight], 64.0 * weight, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out[layer.bias], 64.0 * bias, atol=1e-4, rtol=1e-4)


def test_the_fastest_convolution_rule_tries_each_rule_on_the_first_calls_of_a_shape_then_keeps_one(monkeypatch) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 8, 3, padding=1)
    rule = FastestConvolutionRule(repeats=2)
    tried = []
    names = conv_rules(layer, torch.randn(1, 16, 6, 6))
    assert len(names) > 1
    for name in names:
        def counted(*args, _rule=CONV_RULES[name], _name=name):
            tried.append(_name)
            return _rule(*args)

        monkeypatch.setitem(CONV_RULES, name, counted)
    calls = 0
    while not rule.chosen:  # Poisson batches around 64: one size class
        n = (60, 64, 50, 64)[calls % 4]
        x, g = torch.randn(n, 16, 6, 6), torch.randn(n, 8, 6, 6)
        out = rule(layer, [x], g, scale=2.0)  # every trial is a real, exact result
        torch.testing.assert_close(out[layer.weight], 2.0 * loop_reference(layer, x, g)[0], atol=1e-5, rtol=1e-4)
        calls += 1
    # each rule tried repeats + 1 times, in turn, on the real calls; then one kept for the size class
    assert calls == len(names) * 3 and sorted(tried) == sorted(names * 3)
    assert list(rule.chosen.values())[0] in names and not rule._trials
    tried.clear()
    for n in (64, 33):
        rule(layer, [torch.randn(n, 16, 6, 6)], torch.randn(n, 8, 6, 6))
    assert tried == [next(iter(rule.chosen.values()))] * 2
    rule(layer, [torch.randn(64, 16, 5, 5)], torch.randn(64, 8, 5, 5))  # another image size: tried again
    rule(layer, [torch.randn(200, 16, 6, 6)], torch.randn(200, 8, 6, 6))  # another batch size class: tried again
    assert len(rule._trials) == 2


@pytest.mark.parametrize("shape", [(5, 12), (5, 7, 12), (5, 3, 4, 12)])
def test_linear_rule_equals_opacus_and_a_loop_of_single_example_gradients(shape) -> None:
    from opacus.grad_sample.linear import compute_linear_grad_sample

    from privdiff.defenses.per_sample_grads import linear_per_example_grads

    torch.manual_seed(0)
    layer = nn.Linear(12, 6)
    x = torch.randn(shape)
    g = torch.randn(*shape[:-1], 6)
    out = linear_per_example_grads(layer, [x], g)
    opacus = compute_linear_grad_sample(layer, [x], g)
    for n in range(shape[0]):
        layer.zero_grad()
        (layer(x[n : n + 1]) * g[n : n + 1]).sum().backward()
        torch.testing.assert_close(out[layer.weight][n], layer.weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[layer.bias][n], layer.bias.grad, atol=1e-5, rtol=1e-4)
    for p in (layer.weight, layer.bias):
        torch.testing.assert_close(out[p], opacus[p])
        torch.testing.assert_close(linear_per_example_grads(layer, [x], g, scale=7.0)[p], 7.0 * opacus[p])
    out[layer.bias].add_(1.0)  # the rule's results are its own: the gradient autograd handed on is unchanged
    torch.testing.assert_close(linear_per_example_grads(layer, [x], g)[layer.bias], opacus[layer.bias])


@pytest.mark.parametrize("shape,groups", [((5, 8, 6, 6), 4), ((5, 6, 7), 3), ((5, 8, 3, 3), 8)])
def test_group_norm_rule_equals_a_loop_of_single_image_gradients(shape, groups) -> None:
    from opacus.grad_sample.group_norm import compute_group_norm_grad_sample

    from privdiff.defenses.per_sample_grads import group_norm_per_example_grads

    torch.manual_seed(0)
    layer = nn.GroupNorm(groups, shape[1])
    nn.init.normal_(layer.weight)
    x, g = torch.randn(shape) * 3 + 1, torch.randn(shape)
    weights, biases = [], []
    for n in range(shape[0]):
        layer.zero_grad()
        (layer(x[n : n + 1]) * g[n : n + 1]).sum().backward()
        weights.append(layer.weight.grad.clone())
        biases.append(layer.bias.grad.clone())
    inputs = [x] + ([x.to(memory_format=torch.channels_last)] if x.dim() == 4 else [])
    # the forward pass's statistics, as FastGradSampleModule captures them from autograd
    _, mean, rstd = torch.ops.aten.native_group_norm(x, layer.weight, layer.bias, shape[0], shape[1], x[0, 0].numel(), groups, layer.eps)
    for xx, stats in [(xx, stats) for xx in inputs for stats in ([], [mean, rstd])]:
        out = group_norm_per_example_grads(layer, [xx, *stats], g)
        torch.testing.assert_close(out[layer.weight], torch.stack(weights), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[layer.bias], torch.stack(biases), atol=1e-5, rtol=1e-4)
        opacus = compute_group_norm_grad_sample(layer, [xx], g)
        scaled = group_norm_per_example_grads(layer, [xx, *stats], g, scale=5.0)
        for p in (layer.weight, layer.bias):
            torch.testing.assert_close(out[p], opacus[p])
            torch.testing.assert_close(scaled[p], 5.0 * opacus[p])
    layer.bias.requires_grad_(False)
    assert list(group_norm_per_example_grads(layer, [x], g)) == [layer.weight]


def test_an_empty_batch_gets_empty_per_example_gradients() -> None:
    layer = nn.Conv2d(8, 4, 3, padding=1)
    out = conv2d_per_example_grads(layer, [torch.zeros(0, 8, 6, 6)], torch.zeros(0, 4, 6, 6))
    assert out[layer.weight].shape[1:] == layer.weight.shape and out[layer.weight].shape[0] in (0, 1)


def strided_samples(n: int) -> list[torch.Tensor]:
    """Per-example gradients in several memory layouts: contiguous, permuted (as the convolution
    rule returns them), and sliced (not a permutation of a dense block)."""
    torch.manual_seed(1)
    dense = torch.randn(n, 6, 4, 3, 3)
    permuted = torch.randn(9, n, 6, 4).permute(1, 2, 3, 0).unflatten(-1, (3, 3))
    sliced = torch.randn(n, 10, 7)[:, ::2, 1:]
    return [dense, permuted, sliced, torch.randn(n, 5)]


def test_norms_and_weighted_sums_do_not_depend_on_memory_layout() -> None:
    samples = strided_samples(6)
    assert not samples[1].is_contiguous() and not samples[2].is_contiguous()
    expected = torch.stack([g.reshape(6, -1).norm(dim=1) for g in samples], 1).norm(dim=1)
    torch.testing.assert_close(per_example_norms(samples), expected)
    weights = torch.rand(6)
    for g in samples:
        total = weighted_example_sum(g, weights)
        torch.testing.assert_close(total, torch.einsum("i,i...", weights, g))
        assert total.shape == g.shape[1:] and total.is_contiguous()


@pytest.mark.parametrize("max_grad_norm", [0.05, 100.0])
def test_layout_free_clipping_equals_opacus_clipping(max_grad_norm: float) -> None:
    samples = strided_samples(6)
    sums, grads = [], []
    for cls in (DPOptimizer, ClippingDPOptimizer):
        params = [nn.Parameter(torch.zeros(g.shape[1:])) for g in samples]
        for p, g in zip(params, samples):
            p.grad_sample = g.clone() if cls is DPOptimizer else g
        opt = cls(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=6)
        opt.clip_and_accumulate()
        sums.append([p.summed_grad for p in params])
        opt.add_noise()
        opt.scale_grad()  # privdiff's reads the accumulated iterations once
        grads.append([p.grad for p in params])
    for ours, opacus in zip(*reversed(sums)):
        torch.testing.assert_close(ours, opacus)
    for ours, opacus in zip(*reversed(grads)):
        torch.testing.assert_close(ours, opacus)
    if max_grad_norm > 10:  # no example reaches the bound: the plain sum
        for total, g in zip(sums[1], samples):
            torch.testing.assert_close(total, g.sum(0))
    else:  # every example is clipped: the sum of 6 is within 6 C
        assert torch.cat([t.flatten() for t in sums[1]]).norm() <= 6 * max_grad_norm * (1 + 1e-5)


def test_a_whole_clipping_step_equals_opacus_also_after_a_skipped_step() -> None:
    """``step()`` through privdiff's ``pre_step`` (per-example gradients read once, one division of the noised
    buffer) moves the weights as Opacus's, also when the previous batch was accumulated without a step."""
    samples = strided_samples(6)
    weights = []
    for cls in (DPOptimizer, ClippingDPOptimizer):
        params = [nn.Parameter(torch.zeros(g.shape[1:])) for g in samples]
        opt = cls(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=6)
        for skip in (True, False):  # a batch accumulated (its step skipped), then one stepped
            for p, g in zip(params, samples):
                p.grad_sample = g.clone()
            opt.signal_skip_step(do_skip=skip)
            opt.step()
        weights.append([p.detach().clone() for p in params])
        assert all(p.grad is not None for p in params)
        opt.zero_grad()  # privdiff's: torch's default, no gradient kept; Opacus's zero-fills each one
        assert all(p.grad_sample is None for p in params)
        assert all(p.grad is None if cls is ClippingDPOptimizer else not p.grad.any() for p in params)
    for ours, opacus in zip(*reversed(weights)):
        torch.testing.assert_close(ours, opacus)
    assert any(w.abs().sum() > 0 for w in weights[1])


class SharedLayers(nn.Module):
    """A convolution and a linear layer each applied twice in one forward pass (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.lin = nn.Linear(8 * 5 * 5, 8 * 5 * 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.tanh(self.conv(x)))
        flat = x.flatten(1)
        return self.lin(torch.tanh(self.lin(flat)))


def test_layers_used_twice_get_the_summed_per_example_gradients_through_the_input_only_backward() -> None:
    from privdiff.defenses.per_sample_grads import FastGradSampleModule

    torch.manual_seed(0)
    model, x = SharedLayers(), torch.randn(4, 8, 5, 5)
    reference = []
    for n in range(4):
        model.zero_grad()
        model(x[n : n + 1]).pow(2).sum().backward()
        reference.append({name: p.grad.clone() for name, p in model.named_parameters()})
    model.zero_grad()
    wrapped = FastGradSampleModule(model, batch_first=True, loss_reduction="sum")
    wrapped(x).pow(2).sum().backward(inputs=wrapped.backward_inputs())
    for name, p in model.named_parameters():
        assert p.grad is None
        torch.testing.assert_close(p.grad_sample, torch.stack([r[name] for r in reference]), atol=1e-5, rtol=1e-4)


def test_norms_taken_during_backward_are_the_norms_of_the_stored_gradients_until_these_change() -> None:
    from privdiff.defenses.per_sample_grads import FastGradSampleModule

    torch.manual_seed(0)
    # tied layers (complete only after their second use) and a convolution whose rule returns a permuted view
    model = nn.Sequential(SharedLayers(), nn.Unflatten(1, (8, 5, 5)), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 4, 3, padding=1))
    wrapped = FastGradSampleModule(model, batch_first=True, loss_reduction="sum")
    wrapped.GRAD_SAMPLERS[nn.Conv2d] = partial(conv2d_per_example_grads, rule="shifted")
    wrapped(torch.randn(4, 8, 5, 5)).pow(2).sum().backward(inputs=wrapped.backward_inputs())
    params = list(model.parameters())
    samples = [p.grad_sample for p in params]
    # large parameters' norms are kept; the small ones are clipped as one block, their norms taken then
    assert [hasattr(g, "_privdiff_example_norms") for g in samples] == [p.numel() > SMALL_PARAMETER for p in params]
    assert not samples[-2].is_contiguous() and params[-2].numel() > SMALL_PARAMETER

    def recomputed() -> torch.Tensor:
        return torch.stack([g.reshape(4, -1).norm(dim=1) for g in samples], 1).norm(dim=1)

    torch.testing.assert_close(per_example_norms(samples), recomputed())
    samples[0].mul_(3.0)  # an in-place change after the backward pass: the stored norms no longer count
    samples[-2][1:].zero_()  # ... also through a view
    torch.testing.assert_close(per_example_norms(samples), recomputed())


# -- the Opacus internals per_sample_grads is built on ----------------------------------------------
# per_sample_grads copies the logic of these Opacus 1.6.0 functions or calls them directly (some are
# private). If an Opacus upgrade changes any of them, this test fails: re-read the new source, port
# the change into per_sample_grads, then update the fingerprint here.
OPACUS_INTERNALS = {
    "opacus.grad_sample.grad_sample_module.GradSampleHooks.capture_backprops_hook": "b46e25b8319c43ef",
    "opacus.grad_sample.grad_sample_module.GradSampleHooks.add_hooks": "1b2c65cf443e7758",
    "opacus.grad_sample.grad_sample_module.GradSampleHooks.capture_activations_hook": "379784e95a086cf2",
    "opacus.grad_sample.grad_sample_module.GradSampleHooks.rearrange_grad_samples": "4a25a1d894df7d7a",
    "opacus.grad_sample.grad_sample_module.create_or_accumulate_grad_sample": "473937338191170b",
    "opacus.grad_sample.grad_sample_module.promote_current_grad_sample": "cfc497273ac218e4",
    "opacus.optimizers.optimizer._check_processed_flag": "cda9cba61a6691e1",
    "opacus.optimizers.optimizer._mark_as_processed": "ad66ff8bdcd4e049",
    "opacus.optimizers.optimizer.DPOptimizer.clip_and_accumulate": "28dc9fe15da665d3",
    "opacus.optimizers.optimizer.DPOptimizer.scale_grad": "ec629064142b9495",
    "opacus.optimizers.optimizer.DPOptimizer.pre_step": "3c219ca43a5d89df",
    "opacus.optimizers.optimizer.DPOptimizer.zero_grad": "e364e5e88ab3e8f9",
    "opacus.optimizers.optimizer.DPOptimizer.add_noise": "4380705bf5d8f89b",
    "opacus.optimizers.optimizer._generate_noise": "904f98a78dac3947",
    "opacus.optimizers.ddpoptimizer.DistributedDPOptimizer.add_noise": "a0d22cac10271631",
    "opacus.grad_sample.linear.compute_linear_grad_sample": "d4be9ef341d60f9c",
    "opacus.grad_sample.functorch.ft_compute_per_sample_gradient": "69813a93e49c24ca",
    "opacus.grad_sample.functorch.prepare_layer": "cb19353df1ff65b5",
    "opacus.grad_sample.conv.compute_conv_grad_sample": "6a7e5686281385e4",
    "opacus.grad_sample.group_norm.compute_group_norm_grad_sample": "f61c75ff078dbb4a",
}


def _resolve(path: str):
    import importlib

    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


@pytest.mark.parametrize("path", sorted(OPACUS_INTERNALS))
def test_the_opacus_internals_we_build_on_are_unchanged(path: str) -> None:
    import hashlib
    import inspect

    source = inspect.getsource(_resolve(path))
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == OPACUS_INTERNALS[path], (
        f"{path} changed in this Opacus version: check defenses/per_sample_grads.py against it"
    )


def test_noise_drawn_in_one_call_is_opacus_noise_for_every_parameter_and_never_repeats() -> None:
    """ClippingDPOptimizer draws all parameters' noise at once: each coordinate still gets its own
    N(0, (sigma C)^2) draw, no parameter shares another's, and no step repeats the previous one's."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(300, 200)), nn.Parameter(torch.zeros(300, 200)), nn.Parameter(torch.zeros(7))]
    sigma, bound = 1.5, 0.4
    opt = ClippingDPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=sigma, max_grad_norm=bound, expected_batch_size=4)
    draws = []
    for _ in range(2):
        for p in params:
            p.grad_sample = torch.zeros(4, *p.shape)
        opt.clip_and_accumulate()
        opt.add_noise()
        assert all(p.grad.shape == p.shape for p in params)
        draws.append(torch.cat([p.grad.flatten() for p in params]).clone())
        opt.zero_grad()
    noise = draws[0]
    assert abs(noise.std().item() / (sigma * bound) - 1) < 0.01 and abs(noise.mean().item()) < 0.01
    first, second = params_noise = noise[:60000], noise[60000:120000]
    assert abs(torch.corrcoef(torch.stack(params_noise))[0, 1].item()) < 0.02  # the two equal-shaped parameters differ
    assert not torch.equal(first, second) and not torch.equal(draws[0], draws[1])
    assert abs(torch.corrcoef(torch.stack(draws))[0, 1].item()) < 0.02
