"""The Defense contract: default hooks do nothing, the stack composes, prefixes and refuses conflicts."""

from __future__ import annotations

import pytest
import torch

from privdiff.defenses.base import Defense, DefenseStack, GenerationContext
from privdiff.defenses.output_filter import OutputFilterDefense
from privdiff.train.data import ImageTable, Manifest


class Owner(Defense):
    owns_optimizer = True

    def __init__(self, name: str) -> None:
        self.name = name


class DropFirst(Defense):
    name = "drop_first"

    def transform_dataset(self, dataset, manifest):
        manifest.record_removed(dataset.ids[0], dataset.ids[-1], self.name)
        return dataset.select(range(1, len(dataset)))

    def keep_mask(self, images, context):
        return torch.arange(len(images)) % 2 == 0

    def metrics(self):
        return {"removed": 1}


def _table(n: int) -> ImageTable:
    return ImageTable(torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.zeros(n), [f"x/{i}" for i in range(n)])


def _manifest() -> Manifest:
    return Manifest(seed=0, source={}, image_shape=[1, 4, 4], num_classes=0, members=[], heldout=[])


def test_base_hooks_do_nothing() -> None:
    d, table, model = Defense(), _table(3), torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert d.transform_dataset(table, _manifest()) is table
    assert d.wrap_model(model) is model and d.wrap_optimizer(opt, model) is opt
    assert d.keep_mask(torch.zeros(2, 1, 4, 4), GenerationContext()) is None
    assert d.metrics() == {} and d.should_stop() is None and d.state_dict() == {}


def test_stack_refuses_two_optimizer_owners_and_repeated_names() -> None:
    with pytest.raises(ValueError, match="both replace the optimizer"):
        DefenseStack([Owner("a"), Owner("b")])
    with pytest.raises(ValueError, match="once"):
        DefenseStack([DropFirst(), DropFirst()])


def test_stack_applies_in_order_and_prefixes_metrics() -> None:
    stack = DefenseStack([DropFirst(), OutputFilterDefense(threshold=0.5)])
    manifest = _manifest()
    out = stack.transform_dataset(_table(4), manifest)
    assert out.ids == ["x/1", "x/2", "x/3"] and manifest.removed[0]["kept"] == "x/3"
    metrics = stack.metrics()
    assert metrics["defense/drop_first/removed"] == 1 and "defense/output_filter/reject_rate" in metrics
    assert stack.describe() == "drop_first + output_filter(cal-l2<0.5)"


def test_stack_keep_masks_combine_and_empty_data_is_refused() -> None:
    stack = DefenseStack([DropFirst()])
    assert stack.keep_mask(torch.zeros(4, 1, 4, 4), GenerationContext()).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="removed every training image"):
        stack.transform_dataset(_table(1), _manifest())


def test_output_filter_rejects_copies_and_says_it_gives_no_guarantee() -> None:
    reference = torch.rand(60, 16)
    f = OutputFilterDefense(threshold=1.0)
    images = torch.cat([reference[:3] + 0.001, torch.rand(3, 16)]).clamp(0, 1).view(6, 1, 4, 4)
    keep = f.keep_mask(images, GenerationContext(reference=reference))
    assert keep.tolist()[:3] == [False, False, False]
    assert f.metrics()["rejected"] == int((~keep).sum()) and f.reject_rate == pytest.approx(float((~keep).float().mean()))
    assert "no DP guarantee" in f.metrics()["guarantee"] and "no DP guarantee" in OutputFilterDefense.__doc__
    with pytest.raises(ValueError, match="threshold must be > 0"):
        OutputFilterDefense(threshold=0)
