"""scripts/bench_dp.py: its ceiling mode frees exactly the convolution weights' per-example rules, and it reports
each mode's ratio paired by repeat without checking the ceiling against Opacus."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from privdiff.model import Batch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/model/tiny.yaml"


def _per_example_grads(bench, mode: str, batch: Batch) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    _, den = bench.step_fn(mode, batch, TINY)
    defense = den.bench_parts["defense"]
    torch.manual_seed(3)  # the same timesteps and noise in both modes
    den.per_example_loss(batch).mean().backward(inputs=defense.backward_inputs(den.trainable))
    defense.on_before_optimizer_step(den.trainable)
    owners = {id(p): m for m in den.trainable.modules() for p in m.parameters(recurse=False)}
    return {name: (owners[id(p)], p.grad_sample.clone()) for name, p in den.trainable.named_parameters() if p.requires_grad}


def test_the_ceiling_zeroes_the_convolution_weights_and_nothing_else(load_script):
    bench = load_script("bench_dp")
    torch.manual_seed(0)
    batch = Batch(torch.rand(4, 1, 16, 16), None, torch.arange(4))
    real = _per_example_grads(bench, "hooks", batch)
    free = _per_example_grads(bench, "hooks-free-conv", batch)
    assert real.keys() == free.keys()
    conv_weights = 0
    for name, (layer, grad) in free.items():
        if isinstance(layer, nn.Conv2d) and name.endswith("weight"):
            conv_weights += 1
            assert not grad.any(), name
            assert real[name][1].any(), name  # the real rule gives something to free
        else:
            torch.testing.assert_close(grad, real[name][1], rtol=1e-5, atol=1e-7, msg=name)
    assert conv_weights > 3


def test_the_report_pairs_ratios_by_repeat_and_checks_only_private_modes(load_script, capsys):
    load_script("bench_dp").main(model=TINY, batch=4, steps=1, repeats=2, warmup=1, modes=("none", "hooks", "hooks-free-conv"))
    out = capsys.readouterr().out
    assert "hooks vs stock opacus" in out
    assert "hooks-free-conv vs stock opacus" not in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "paired by repeat" in lines["hooks"]
    assert "not private" in lines["hooks-free-conv"] and "not private" not in lines["hooks"]


def test_one_repeat_reports_without_a_paired_ratio(load_script, capsys):
    load_script("bench_dp").main(model=TINY, batch=4, steps=1, repeats=1, warmup=0, modes=("none", "hooks"))
    out = capsys.readouterr().out
    assert "of non-private" in out and "paired by repeat" not in out
