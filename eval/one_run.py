"""Epsilon from outside: the one-run audit of Steinke, Nasr and Jagielski (NeurIPS 2023) on the run's canaries.

m canaries are each in the training independently with probability 1/2. After the run a guesser scores them and
guesses "in" for the k+ highest and "out" for the k- lowest (abstaining on the rest). If the training is
(epsilon, delta)-DP, the number v of right guesses among r = k+ + k- is stochastically dominated by a
Binomial(r, e^eps / (1 + e^eps)) plus a delta term (their Theorem 3.3): so a v too large for the claimed epsilon at
confidence 1 - beta is a proof that the claim is false, and the largest epsilon the binomial tail still rejects is an
empirical lower bound. Several (k+, k-) are tried and each pays beta / (number tried) (a union bound), so choosing the
best after seeing the scores is paid for.

What it proves and what it does not: a bound above the claimed epsilon means the implementation is broken
(VIOLATED). A bound below it is consistent, which certifies nothing: one run with m canaries can prove at most about
``ln(m / ln(1/beta))`` even when every guess is right; :func:`ceiling` says that figure beside every bound.

The tail, its delta term and the binary search are written here (not taken from a library): no maintained package
computes this bound; the formula follows the paper's Algorithm/Theorem and is tested against its properties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from .plugin import AuditContext, AuditPlugin, Column, SummaryResult

__all__ = ["OneRunAudit", "ceiling", "epsilon_lower_bound", "guesses_bound", "p_value"]


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses right] under (epsilon, delta)-DP, for ``m`` canaries (Steinke et al. Thm 3.3)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"one-run audit needs 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))
    # the delta term: 2 m delta * max_i P[v - i <= Binom(r, q) < v] / i
    if delta == 0 or v == 0:
        return min(1.0, tail)
    i = np.arange(1, v + 1)
    alpha = float((np.cumsum(stats.binom.pmf(v - i, r, q)) / i).max())
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, beta: float, delta: float) -> float:
    """The largest epsilon whose p-value for ``v`` of ``r`` right is still below ``beta`` (0 when none is)."""
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < beta:
        low, high = high, high * 2
        if high > 200:
            return high
    for _ in range(30):  # to about 1e-9 of the bracket
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < beta else (low, mid)
    return low


def candidate_guesses(m: int) -> list[tuple[int, int]]:
    """The (k+, k-) tried, fixed before seeing any score: a few shares of m, "in" guesses alone and both sides."""
    shares = sorted({max(1, round(m * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5)})
    return [(k, 0) for k in shares] + [(k, k) for k in shares if 2 * k <= m]


def ceiling(m: int, beta: float, delta: float) -> float:
    """The most a one-run audit of ``m`` canaries can prove at confidence 1 - beta: every guess right, at the best
    of :func:`candidate_guesses` (each paying its share of beta)."""
    choices = candidate_guesses(m)
    return max(epsilon_lower_bound(m, k + j, k + j, beta / len(choices), delta) for k, j in choices)


def guesses_bound(scores: Sequence[float] | torch.Tensor, included: Sequence[bool] | torch.Tensor, beta: float,
                  delta: float) -> dict[str, Any]:
    """The best bound over :func:`candidate_guesses` (union bound): top k+ scores guessed in, bottom k- out."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    included = torch.as_tensor(included, dtype=torch.bool)
    m = len(scores)
    order = torch.argsort(scores, descending=True, stable=True)
    choices = candidate_guesses(m)
    best = {"epsilon": 0.0, "k_plus": 0, "k_minus": 0, "right": 0, "guesses": 0}
    for k_plus, k_minus in choices:
        right = int(included[order[:k_plus]].sum()) + (int((~included[order[m - k_minus:]]).sum()) if k_minus else 0)
        bound = epsilon_lower_bound(m, k_plus + k_minus, right, beta / len(choices), delta)
        if bound > best["epsilon"]:
            best = {"epsilon": bound, "k_plus": k_plus, "k_minus": k_minus, "right": right, "guesses": k_plus + k_minus}
    return {**best, "choices": len(choices), "beta": beta, "m": m}


def standardized_scores(sums: torch.Tensor, squares: torch.Tensor, steps: int) -> torch.Tensor:
    """Each canary's summed release over the noise its own coordinate carried: sum / (sd * sqrt(T)).

    Standardizing by the canary's own spread (not the claimed sigma) puts a coordinate the noise never reached at
    the top when its canary was in and at 0 when it was out, whatever the other coordinates carry.
    """
    mean = sums / steps
    sd = (squares / steps - mean**2).clamp(min=0).sqrt()
    z = sums / (sd * math.sqrt(steps))
    return torch.where(sd > 1e-9, z, torch.sign(sums) * 1e9)


@dataclass
class OneRunAudit(AuditPlugin):
    """The one-run epsilon lower bound from the run's gradient canaries (``dp_sgd: gradient_canaries: m``).

    Args:
        confidence: 1 - beta of the bound (shared over every (k+, k-) tried).
    """

    name = "one_run"
    needs_samples = False
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ValueError(f"one_run confidence must be in (0, 1), got {self.confidence}")

    def run(self, context: AuditContext) -> SummaryResult | None:
        evidence = context.evidence.get("gradient_canaries")
        if not evidence or not evidence.get("steps"):
            return None
        beta, delta = 1 - self.confidence, float(evidence["delta"])
        scores = standardized_scores(torch.tensor(evidence["sums"], dtype=torch.float64),
                                     torch.tensor(evidence["squares"], dtype=torch.float64), int(evidence["steps"]))
        found = guesses_bound(scores, evidence["included"], beta, delta)
        claimed = float(evidence["claimed_epsilon"])
        top = ceiling(found["m"], beta, delta)
        verdict = "VIOLATED" if found["epsilon"] > claimed else ("consistent" if claimed < top else "consistent (no answer: above the ceiling)")
        summary = {
            **found, "kind": evidence["kind"], "confidence": self.confidence, "delta": delta, "claimed_epsilon": claimed,
            "ceiling": top, "verdict": verdict, "steps": int(evidence["steps"]), "sample_rate": evidence["sample_rate"],
            "noise_multiplier": evidence.get("noise_multiplier"),
        }
        return OneRunResult(summary)


class OneRunResult(SummaryResult):
    def columns(self) -> list[Column]:
        s = self.summary
        short = "no answer (ε above the ceiling)" if s["verdict"].startswith("consistent (") else s["verdict"]
        text = f"{s['epsilon']:.3g} vs ε {s['claimed_epsilon']:.3g} · ceiling {s['ceiling']:.3g} · {short}"
        # no privacy role: a lower bound on the mechanism is not leakage of the members, and has no place on the
        # privacy-utility axes beside the attacks
        return [Column("one_run_epsilon", "ε lower bound (canaries)", "", s["epsilon"], text)]

    def scalars(self) -> dict[str, float]:
        return {"one_run_epsilon": self.summary["epsilon"], "one_run_ceiling": self.summary["ceiling"]}

    def notes(self) -> list[str]:
        s = self.summary
        text = (f"One-run audit (Steinke et al. 2023) of the DP-SGD step with {s['m']} {s['kind']} over {s['steps']} steps "
                f"(q {s['sample_rate']:.3g}): {s['right']} of {s['guesses']} guesses right (k+ {s['k_plus']}, k- "
                f"{s['k_minus']}, the best of {s['choices']} choices fixed in advance, each at beta/{s['choices']}), "
                f"epsilon >= {s['epsilon']:.3g} at {s['confidence']:.0%} confidence against the accountant's "
                f"{s['claimed_epsilon']:.3g}: {s['verdict']}. With {s['m']} canaries no run can show more than "
                f"{s['ceiling']:.3g}; a bound below the claim is consistent with it and certifies nothing.")
        if s["verdict"] == "VIOLATED":
            text += (" The implementation does not give the epsilon it reports: look for noise that is missing or "
                     "scaled wrong, or parameters trained outside the clipping and the noise.")
        return [text]
