"""Preparation stages: a Lightning stage takes the steps of the hand-written loop it replaces, leaves the run
around it as it found it, and what it fits is kept by content."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from privdiff.train.preparation import CachedFit, ClassifierFit, SeededBatches, run_preparation


def classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.0), nn.SiLU(), nn.Linear(8, 3))


def data(n: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_seeded_batches_repeat_exactly_from_the_generator_state_they_were_given() -> None:
    g = torch.Generator().manual_seed(3)
    torch.rand(2, generator=g)  # a generator already used for something else (a split)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(3))[2:]
    batches = SeededBatches(lambda gen: (torch.rand(1, generator=gen) for _ in range(2)), 2, g)
    first, again = list(batches), list(batches)
    assert len(batches) == 2 and torch.equal(torch.cat(first), expected) and torch.equal(torch.cat(again), expected)


def test_a_stage_takes_the_steps_of_the_hand_written_loop_bit_for_bit() -> None:
    images, labels = data()
    staged = classifier()
    run_preparation(ClassifierFit(staged, lr=1e-2), ClassifierFit.batches(images, labels, 3, 8, torch.Generator().manual_seed(5)))
    by_hand = classifier()
    g, opt = torch.Generator().manual_seed(5), torch.optim.Adam(by_hand.parameters(), lr=1e-2)
    for _ in range(3):
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), 8):
            loss = F.cross_entropy(by_hand(images[order[i : i + 8]]), labels[order[i : i + 8]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for a, b in zip(staged.parameters(), by_hand.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(staged.parameters()), next(classifier().parameters()))  # and it did train


def test_a_stage_leaves_modes_frozen_parameters_gradients_and_the_global_random_state_as_it_found_them() -> None:
    images, labels = data()
    model = classifier()
    model.eval()
    model[1].requires_grad_(False)
    kept = torch.ones_like(model[4].weight)
    model[4].weight.grad = kept
    state = torch.get_rng_state()
    run_preparation(ClassifierFit(model, lr=1e-2), ClassifierFit.batches(images, labels, 1, 8, torch.Generator().manual_seed(0)))
    assert torch.equal(torch.get_rng_state(), state)
    assert not any(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    assert model[4].weight.grad is kept and model[4].bias.grad is None
    # a stage of no steps does nothing at all
    before = [p.detach().clone() for p in model.parameters()]
    run_preparation(ClassifierFit(model, lr=1e-2), ClassifierFit.batches(images, labels, 0, 8, torch.Generator()))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_fit_is_kept_by_its_content_in_one_atomic_file(tmp_path) -> None:
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    entry = CachedFit.keyed(tmp_path, "settings", torch.ones(3), b"raw")
    assert entry == CachedFit.keyed(tmp_path, "settings", torch.ones(3), b"raw")
    assert entry != CachedFit.keyed(tmp_path, "settings", torch.zeros(3), b"raw")
    assert entry.load() is None
    entry.save(weights, {"record": "{}"})
    tensors, metadata = entry.load()
    assert torch.equal(tensors["w"], weights["w"]) and metadata["record"] == "{}"
    assert [p.name for p in tmp_path.iterdir()] == [entry.path.name]  # no temporary file left beside it
