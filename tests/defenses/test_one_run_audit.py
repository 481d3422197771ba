"""The one-run audit (Steinke et al. 2023) with white-box gradient canaries: a correct DP-SGD step is never caught
above its epsilon, and three planted bugs are reported as VIOLATED."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privdiff.defenses.dp_sgd import DPSGDDefense
from privdiff.eval.one_run import OneRunAudit, ceiling, epsilon_lower_bound, guesses_bound, p_value

from .planted_dp_bugs import BUGS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- the bound ---------------------------------------------------------------------------------------
def test_the_bound_is_monotone_and_capped_by_the_canary_count() -> None:
    assert p_value(100, 50, 40, 1.0, 0) > p_value(100, 50, 45, 1.0, 0)  # more right: less likely under the claim
    assert p_value(100, 50, 45, 2.0, 0) > p_value(100, 50, 45, 1.0, 0)  # a weaker claim explains more
    assert p_value(100, 50, 45, 1.0, 1e-3) > p_value(100, 50, 45, 1.0, 0)  # delta is paid for
    assert epsilon_lower_bound(1000, 100, 50, 0.05, 1e-5) == 0.0  # chance accuracy proves nothing
    for m in (100, 1000):  # every guess right: about ln(m / ln(1/beta)), and no higher
        top = ceiling(m, 0.05, 0.0)
        assert top <= math.log(m / math.log(1 / 0.05)) + 0.01 and top > math.log(m / math.log(1 / 0.05)) - 1
    assert ceiling(10_000, 0.05, 1e-5) < ceiling(10_000, 0.05, 0.0) - 1  # delta = 1e-5 caps what 10^4 canaries show


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of mu-GDP at delta (Dong, Roth and Su 2019)."""
    def delta_of(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    low, high = 0.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize("mu", [1.0, 4.0])
def test_a_gaussian_mechanism_is_never_bounded_above_its_epsilon_more_often_than_beta(mu) -> None:
    """Scores N(mu * included, 1) are exactly mu-GDP for each canary: over 100 audits the bound exceeds the exact
    epsilon in at most beta of them."""
    delta, beta, m = 1e-5, 0.05, 1000
    eps = _gaussian_epsilon(mu, delta)
    g = torch.Generator().manual_seed(int(mu * 10))
    above, bounds = 0, []
    for _ in range(100):
        included = torch.rand(m, generator=g) < 0.5
        scores = torch.randn(m, generator=g, dtype=torch.float64) + mu * included
        bound = guesses_bound(scores, included, beta, delta)["epsilon"]
        bounds.append(bound)
        above += bound > eps
    assert above <= 100 * beta
    assert sum(bounds) / len(bounds) > 0.3 * min(eps, ceiling(m, beta, delta))  # and it is not vacuous


# -- the DP-SGD step -----------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 32)
        self.norm = nn.GroupNorm(4, 32)
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.body(x))))


def lora_toy() -> nn.Module:
    """The toy with rank-8 LoRA adapters on both linear layers (peft); the norm layer stays trainable beside them,
    as a text encoder or a norm layer left trainable beside the adapters."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(Toy(), LoraConfig(r=8, lora_alpha=8, target_modules=["body", "head"]))
    for p in model.base_model.model.norm.parameters():
        p.requires_grad_(True)
    return model


def audit_toy(epsilon: float, bug: str | None = None, steps: int = 100, canaries: int = 1000, seed: int = 1,
              lora: bool = False) -> dict:
    """DP-SGD on a toy regression with m gradient canaries, through the Defense contract; the one-run audit's summary."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(256, 16), torch.randn(256, 16))
    defense = DPSGDDefense(target_epsilon=epsilon, steps=steps, max_grad_norm=1.0, gradient_canaries=canaries,
                           debug_noise_seed=seed)  # the same draws every time the test runs
    defense.on_data_ready(256, 64)
    model = defense.wrap_model(lora_toy() if lora else Toy())
    optimizer = defense.wrap_optimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05), model)
    if bug is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        BUGS[bug](optimizer, lambda name: "norm" in name or "head" in name, names)  # the norm layer and the head
    loader = defense.wrap_train_loader(DataLoader(data, batch_size=64))
    done = 0
    while done < steps:
        for x, y in loader:
            if len(x):
                nn.functional.mse_loss(model(x), y).backward()
            defense.on_before_optimizer_step(model)
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == steps:
                break
    context = SimpleNamespace(evidence=defense.audit_evidence())
    result = OneRunAudit().run(context)
    assert result is not None
    return result.summary


@pytest.mark.parametrize("epsilon,lora", [(1.0, False), (4.0, False), (1.0, True)])
def test_a_correct_dp_sgd_step_is_consistent_with_its_epsilon(epsilon, lora) -> None:
    s = audit_toy(epsilon, lora=lora, canaries=400 if lora else 1000)  # the adapters hold 768 coordinates
    assert s["steps"] == 100 and s["m"] == (400 if lora else 1000)
    assert s["claimed_epsilon"] <= epsilon + 1e-6 and s["epsilon"] <= s["claimed_epsilon"]
    assert s["verdict"].startswith("consistent")


@pytest.mark.parametrize("lora", [False, True], ids=["dp_sgd", "dp_lora"])
@pytest.mark.parametrize("bug", sorted(BUGS))
def test_each_planted_bug_is_violated_at_epsilon_one(bug, lora) -> None:
    s = audit_toy(1.0, bug, lora=lora, canaries=400 if lora else 1000)
    assert s["verdict"] == "VIOLATED" and s["epsilon"] > 1.0


def test_the_inclusion_is_fresh_every_run_and_a_checkpoint_keeps_it(tmp_path) -> None:
    """The auditor's secret must not repeat from run to run (fresh entropy, never the seed); a resume keeps it."""
    torch.manual_seed(0)
    first, second = (DPSGDDefense(target_epsilon=1.0, steps=10, gradient_canaries=200) for _ in range(2))
    assert not torch.equal(first.canaries.included, second.canaries.included)
    first.on_data_ready(256, 64)
    model = first.wrap_model(Toy())
    first.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = DPSGDDefense(target_epsilon=1.0, steps=10, gradient_canaries=200)
    resumed.on_data_ready(256, 64)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    again = resumed.wrap_model(Toy())
    resumed.wrap_optimizer(torch.optim.SGD(again.parameters(), lr=0.1), again)
    assert torch.equal(resumed.canaries.included, first.canaries.included)
    assert torch.equal(resumed.canaries.index_of, first.canaries.index_of)
    with pytest.raises(ValueError, match="need as many coordinates"):
        bad = DPSGDDefense(target_epsilon=1.0, steps=10, gradient_canaries=10_000)
        bad.on_data_ready(256, 64)
        tiny = bad.wrap_model(nn.Linear(4, 4))
        bad.wrap_optimizer(torch.optim.SGD(tiny.parameters(), lr=0.1), tiny)
