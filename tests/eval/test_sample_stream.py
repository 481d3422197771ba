"""The audit draws and reduces its samples in shards: the same numbers as one pass, and a killed audit resumes."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from privdiff.eval import audit as audit_module
from privdiff.eval.audit import SHARD_FOLDER, AuditConfig, AuditData, run_audit
from privdiff.eval.carlini import generate_and_filter
from privdiff.eval.extraction import ExtractionAttack
from privdiff.eval.memorization import NNRatioMemorization
from privdiff.eval.plugin import AuditContext
from privdiff.eval.quality import SampleQuality
from privdiff.eval.sample_stream import stream_samples
from privdiff.eval.sampling import Generated
from privdiff.train.data import load_builtin
from privdiff.train.pixel import PixelDiffusion


class CopyingSampler(PixelDiffusion):
    """Samples are noisy copies of six members or uniform noise, chosen by the batch's generator only."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__(16, 1, block_out_channels=(8, 16), attention_levels=(), num_train_timesteps=100)
        self.images = images

    def sample(self, n, solver="ddim", steps=10, cond=None, generator=None):
        rows = torch.randint(0, 6, (n,), generator=generator)
        noise = torch.randn(n, *self.images.shape[1:], generator=generator)
        novel = torch.rand(n, generator=generator) < 0.5
        x = torch.where(novel.view(-1, 1, 1, 1), torch.rand(n, *self.images.shape[1:], generator=generator),
                        self.images[rows] + 0.01 * noise)
        return x.clamp(0, 1)


@pytest.fixture(scope="module")
def digits():
    pool = load_builtin("digits", 16, 1)
    members, heldout = pool.select(range(40)), pool.select(range(40, 80))
    return AuditData(members, heldout, torch.ones(len(members), dtype=torch.long), pool=pool)


def plugins(tmp_path) -> dict:
    return {"quality": SampleQuality(cache_dir=str(tmp_path / "cache")),
            "extraction": ExtractionAttack(min_clique=3, calibrated_n=8),
            "memorization": NNRatioMemorization()}


def comparable(result: dict) -> dict:
    """An audit.json without what may differ between two runs of one audit: timings, folders, how it was resumed."""
    out = json.loads(json.dumps(result))
    for key in ("timings_s", "environment"):
        out.pop(key)
    out["run"].pop("run_dir")
    out["sampling"].pop("resumed_shards")
    if "quality" in out:
        out["quality"].pop("classifier")  # trained by the first audit, read from the cache by the next
    return out


def test_plugins_reduce_shards_as_they_reduce_all_samples_at_once(digits, tmp_path) -> None:
    torch.manual_seed(0)
    model = CopyingSampler(digits.members.unit()[:6])
    samples = model.sample(72, generator=torch.Generator().manual_seed(3))
    found = {}
    for shard_size in (72, 20):  # one shard; four shards, the last one short
        context = AuditContext(model, digits, torch.empty(0, 1, 16, 16), heldout=digits.heldout, calibration=digits.heldout,
                               sample_count=len(samples))
        named = plugins(tmp_path)
        reductions = {name: p.reduction(context) for name, p in named.items()}

        def draw(k, first, count):
            return Generated(samples[first : first + count], None, count, 0)

        streamed = stream_samples(draw, len(samples), shard_size, reductions)
        context.reductions = {id(p): streamed.reduced[name] for name, p in named.items()}
        found[shard_size] = {name: p.run(context).to_dict() for name, p in named.items()}
        found[shard_size]["quality"].pop("classifier")  # trained by the first, read from the cache by the second
    for name in found[72]:
        assert found[20][name] == found[72][name], (name, {k: (v, found[72][name].get(k)) for k, v in found[20][name].items() if v != found[72][name].get(k)})
    assert found[72]["extraction"]["union"]["extracted"] >= 3 and found[72]["memorization"]["num_memorized"] > 0
    # the one-pass run equals the plugin on samples in hand too (a context built by hand)
    context = AuditContext(model, digits, samples, heldout=digits.heldout, calibration=digits.heldout)
    assert ExtractionAttack(min_clique=3, calibrated_n=8).run(context).to_dict() == found[72]["extraction"]


def test_cliques_among_the_candidates_extract_what_cliques_among_all_samples_do(digits) -> None:
    model = CopyingSampler(digits.members.unit()[:6])
    samples = model.sample(96, generator=torch.Generator().manual_seed(4))
    members = digits.members.unit()
    attack = ExtractionAttack(tau=0.1, delta=0.1, calibrated_threshold=0.3, min_clique=4, calibrated_n=8)
    context = AuditContext(model, digits, samples, heldout=digits.heldout, calibration=digits.heldout)
    kept = attack.reduced(context)
    assert 0 < len(kept.images) < len(samples)  # the noise samples are no candidates
    summary = attack.run(context).to_dict()["generate_and_filter"]
    every = generate_and_filter(samples, members, tau=0.1, delta=0.1, min_clique=4)
    assert summary["extracted"] == every.num_extracted >= 3
    assert [r["sample"] for r in summary["records"]] == [r.sample_index for r in sorted(every.records, key=lambda r: r.distance)]


def test_an_audit_killed_mid_sampling_resumes_with_the_numbers_of_an_uninterrupted_one(digits, tmp_path, monkeypatch) -> None:
    model = CopyingSampler(digits.members.unit()[:6])
    config = AuditConfig(num_samples=64, shard_size=16, batch_size=8, steps=2, solver="ddim", progress=False,
                         attacks=plugins(tmp_path))
    whole = run_audit(model, digits, config, run_dir=tmp_path / "whole")
    assert not (tmp_path / "whole" / SHARD_FOLDER).exists()  # removed when the audit ends: they hold copies

    real_generate, calls = audit_module.generate, []

    def killed_at_third_shard(*args, **kwargs):
        calls.append(kwargs["stream"])
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(audit_module, "generate", killed_at_third_shard)
    with pytest.raises(KeyboardInterrupt):
        run_audit(model, digits, config, run_dir=tmp_path / "resumed")
    assert sorted(p.name for p in (tmp_path / "resumed" / SHARD_FOLDER).iterdir()) == ["shard_00000.safetensors", "shard_00001.safetensors"]

    calls.clear()
    monkeypatch.setattr(audit_module, "generate", lambda *a, **k: (calls.append(k["stream"]), real_generate(*a, **k))[1])
    resumed = run_audit(model, digits, config, run_dir=tmp_path / "resumed")
    assert calls == [2, 3] and resumed["sampling"]["resumed_shards"] == 2
    assert comparable(resumed) == comparable(whole)
    assert whole["extraction"]["union"]["extracted"] >= 3  # a non-trivial result was compared


def test_shards_of_another_audit_are_not_resumed_from(digits, tmp_path, monkeypatch) -> None:
    model = CopyingSampler(digits.members.unit()[:6])
    config = AuditConfig(num_samples=32, shard_size=16, batch_size=8, steps=2, solver="ddim", progress=False,
                         attacks={"memorization": NNRatioMemorization()})
    real_generate, calls = audit_module.generate, []

    def killed_at_second_shard(*args, **kwargs):
        calls.append(kwargs["stream"])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(audit_module, "generate", killed_at_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_audit(model, digits, config, run_dir=tmp_path)
    monkeypatch.setattr(audit_module, "generate", real_generate)
    other = AuditConfig(**{**config.__dict__, "seed": 1})
    resumed = run_audit(model, digits, other, run_dir=tmp_path)
    assert resumed["sampling"]["resumed_shards"] == 0
    assert comparable(resumed) == comparable(run_audit(model, digits, other))


def test_the_documented_plugin_with_a_reduction_runs_in_a_streamed_audit(digits, monkeypatch) -> None:
    text = (Path(__file__).parents[2] / "docs" / "extending.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if block.startswith("# myattacks.py"))
    module = types.ModuleType("myattacks")
    monkeypatch.setitem(sys.modules, "myattacks", module)
    exec(compile(code, "docs/extending.md", "exec"), module.__dict__)
    namespace = module.__dict__
    model = CopyingSampler(digits.members.unit()[:6])
    plugin = namespace["NearestMemberDistance"]()
    config = AuditConfig(num_samples=48, shard_size=16, batch_size=8, steps=2, solver="ddim", progress=False,
                         attacks={"nearest_member": plugin})
    result = run_audit(model, digits, config)
    # half the samples are copies of members at l2 ~0.01, half uniform noise far from every digit
    assert 0 < result["nearest_member"]["median_l2"] < 0.5 and result["sampling"]["num_samples"] == 48


def test_every_shard_draws_other_samples(digits) -> None:
    from privdiff.eval.sampling import generate

    model = CopyingSampler(digits.members.unit()[:6])
    drawn = [generate(model, 16, batch_size=8, seed=0, progress=False, stream=k).images for k in range(4)]
    drawn.append(generate(model, 16, batch_size=8, seed=1, progress=False, stream=1).images)
    for i in range(len(drawn)):
        for j in range(i):
            assert not torch.equal(drawn[i], drawn[j]), (i, j)
    assert torch.equal(drawn[2], generate(model, 16, batch_size=8, seed=0, progress=False, stream=2).images)


def test_a_reaudit_of_a_run_resumes_the_newest_killed_audit_folder(tmp_path) -> None:
    from privdiff.eval.audit import _unfinished_audit

    audits = tmp_path / "audits"
    assert _unfinished_audit(audits) is None
    for name, finished in (("20261201-000000", False), ("20261202-000000", False), ("20261203-000000", True)):
        (audits / name / SHARD_FOLDER).mkdir(parents=True)
        if finished:
            (audits / name / "audit.json").write_text("{}")
    assert _unfinished_audit(audits) == audits / "20261202-000000"


def test_a_shard_whose_samples_a_defense_all_rejected_is_reduced_to_nothing(digits, tmp_path) -> None:
    from privdiff.defenses.base import Defense

    class RejectFirstShard(Defense):
        """Rejects every sample drawn before the 16th call (the first shard and its redraws)."""

        name = "reject_first"

        def __init__(self) -> None:
            self.calls = 0

        def keep_mask(self, images, context):
            self.calls += 1
            return torch.full((len(images),), self.calls > 6)

    model = CopyingSampler(digits.members.unit()[:6])
    config = AuditConfig(num_samples=32, shard_size=16, batch_size=8, steps=2, solver="ddim", progress=False,
                         attacks=plugins(tmp_path))
    result = run_audit(model, digits, config, defenses=[RejectFirstShard()])
    # the first shard: 16 drawn in each of 3 rounds, all rejected; the second: 16 drawn and kept
    assert (result["sampling"]["num_samples"], result["sampling"]["num_drawn"], result["sampling"]["num_rejected"]) == (16, 64, 48)
    assert result["memorization"]["num_memorized"] > 0 and result["extraction"]["union"]["extracted"] >= 1


def test_the_fingerprint_reads_weights_and_a_module_s_extra_state() -> None:
    from privdiff.eval.sample_stream import digest

    class WithSettings(torch.nn.Module):  # a state_dict with a non-tensor entry, as some diffusers modules have
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)
            self.settings = {"scale": 1}

        def get_extra_state(self):
            return self.settings

        def set_extra_state(self, state) -> None:
            self.settings = state

    model = WithSettings()
    first = digest("settings", model=model)
    assert digest("settings", model=model) == first and digest("other", model=model) != first
    model.settings = {"scale": 2}
    second = digest("settings", model=model)
    with torch.no_grad():
        model.layer.weight[0, 0] += 1e-3
    assert len({first, second, digest("settings", model=model)}) == 3
