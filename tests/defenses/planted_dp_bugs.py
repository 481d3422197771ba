"""Test-only switches that break a DP-SGD step the way real integrations have: each is applied to privdiff's
clipping DPOptimizer after ``DPSGDDefense.wrap_optimizer``, so production code carries none of them."""

from __future__ import annotations

from typing import Callable

import torch


def _noise_scaled(optimizer, factor: float) -> None:
    """The noise added is ``factor`` times the stated one; the accountant still reads the stated sigma."""
    add_noise = optimizer.add_noise

    def scaled() -> None:
        stated = optimizer.noise_multiplier
        optimizer.noise_multiplier = stated * factor
        try:
            add_noise()
        finally:
            optimizer.noise_multiplier = stated

    optimizer.add_noise = scaled


def noise_off(optimizer, bypass: Callable[[str], bool] | None = None, names: dict | None = None) -> None:
    """The noise is never added, while the accountant counts the planned sigma."""
    _noise_scaled(optimizer, 0.0)


def noise_over_batch(optimizer, bypass=None, names=None) -> None:
    """The noise's standard deviation divided by the batch size: sigma*C/B added to the *sum* (a mean's scale)."""
    _noise_scaled(optimizer, 1.0 / optimizer.expected_batch_size)


def bypass_group(optimizer, bypass: Callable[[str], bool], names: dict) -> None:
    """Parameters whose names ``bypass`` accepts get the plain batch gradient: no clipping, no noise (a norm layer or
    a text encoder left outside the DP wrapper)."""
    outside = [p for p in optimizer.params if bypass(names[id(p)])]
    assert outside, "no parameter matched the bypass rule"

    def unclipped(opt) -> None:
        for p in outside:
            g = opt._get_flat_grad_sample(p)
            p.summed_grad = g.sum(0) if len(g) else torch.zeros_like(p)

    optimizer.__dict__.setdefault("clipped_sum_hooks", []).insert(0, unclipped)
    add_noise = optimizer.add_noise

    def noisy_except_outside() -> None:
        kept = {id(p): p.summed_grad.clone() for p in outside}
        add_noise()
        for p in outside:
            p.grad = kept[id(p)].view_as(p)

    optimizer.add_noise = noisy_except_outside


BUGS = {"noise_off": noise_off, "noise_over_batch": noise_over_batch, "bypass_group": bypass_group}
