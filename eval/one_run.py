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
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import stats

from . import mia_stats
from .mia_attacks import attack_noise, loss_scores, pia_scores
from .plugin import AuditContext, AuditPlugin, Column, SummaryResult, setting_panels, table_condition

__all__ = ["CanaryAudit", "OneRunAudit", "canary_scores", "ceiling", "epsilon_lower_bound", "guesses_bound", "p_value"]


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


def ceiling(m: int, beta: float, delta: float, score_kinds: int = 1) -> float:
    """The most a one-run audit of ``m`` canaries can prove at confidence 1 - beta: every guess right, at the best
    of :func:`candidate_guesses` for each of ``score_kinds`` scores (each choice paying its share of beta)."""
    choices = candidate_guesses(m)
    tried = len(choices) * score_kinds
    return max(epsilon_lower_bound(m, k + j, k + j, beta / tried, delta) for k, j in choices)


def guesses_bound(scores: Sequence[float] | torch.Tensor | Mapping[str, Sequence[float] | torch.Tensor],
                  included: Sequence[bool] | torch.Tensor, beta: float, delta: float) -> dict[str, Any]:
    """The best bound over :func:`candidate_guesses` (union bound): top k+ scores guessed in, bottom k- out.

    ``scores`` may be several named score vectors (e.g. the loss at two timesteps and PIA): every (score, k+, k-)
    is then one choice of the union bound, and the result names the score that gave the best bound.
    """
    score_sets = dict(scores) if isinstance(scores, Mapping) else {"score": scores}
    included = torch.as_tensor(included, dtype=torch.bool)
    m = len(included)
    choices = candidate_guesses(m)
    tried = len(choices) * len(score_sets)
    best = {"epsilon": 0.0, "k_plus": 0, "k_minus": 0, "right": 0, "guesses": 0, "score": next(iter(score_sets))}
    for name, values in score_sets.items():
        values = torch.as_tensor(values, dtype=torch.float64)
        if len(values) != m:
            raise ValueError(f"score {name!r} has {len(values)} values for {m} canaries")
        order = torch.argsort(values, descending=True, stable=True)
        for k_plus, k_minus in choices:
            right = int(included[order[:k_plus]].sum()) + (int((~included[order[m - k_minus:]]).sum()) if k_minus else 0)
            bound = epsilon_lower_bound(m, k_plus + k_minus, right, beta / tried, delta)
            if bound > best["epsilon"]:
                best = {"epsilon": bound, "k_plus": k_plus, "k_minus": k_minus, "right": right, "guesses": k_plus + k_minus,
                        "score": name}
    return {**best, "choices": tried, "beta": beta, "m": m}


def claim_verdict(bound: float, claimed: float | None, top: float) -> str:
    """The bound against the claimed epsilon: ``VIOLATED`` above it, ``consistent`` below, and below a claim at or
    over the ceiling the non-answer it is; ``no DP claim: empirical`` where nothing is claimed."""
    if claimed is None:
        return "no DP claim: empirical"
    if bound > claimed:
        return "VIOLATED"
    return "consistent" if claimed < top else "consistent (no answer: above the ceiling)"


def bound_cell(s: Mapping[str, Any]) -> str:
    """A one-run summary as a table cell: the bound, the claim, the ceiling and a short verdict."""
    if s["claimed_epsilon"] is None:
        return f"{s['epsilon']:.3g} · ceiling {s['ceiling']:.3g} · no DP claim"
    short = "no answer (ε above the ceiling)" if s["verdict"].startswith("consistent (") else s["verdict"]
    return f"{s['epsilon']:.3g} vs ε {s['claimed_epsilon']:.3g} · ceiling {s['ceiling']:.3g} · {short}"


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
        verdict = claim_verdict(found["epsilon"], claimed, top)
        summary = {
            **found, "kind": evidence["kind"], "confidence": self.confidence, "delta": delta, "claimed_epsilon": claimed,
            "ceiling": top, "verdict": verdict, "steps": int(evidence["steps"]), "sample_rate": evidence["sample_rate"],
            "noise_multiplier": evidence.get("noise_multiplier"),
        }
        return OneRunResult(summary)


class OneRunResult(SummaryResult):
    def columns(self) -> list[Column]:
        # no privacy role: a lower bound on the mechanism is not leakage of the members, and has no place on the
        # privacy-utility axes beside the attacks
        return [Column("one_run_epsilon", "ε lower bound (gradient canaries)", "", self.summary["epsilon"], bound_cell(self.summary))]

    def verdict(self) -> str | None:
        s = self.summary
        return f"gradient canaries: ε ≥ {s['epsilon']:.2g} (ceiling {s['ceiling']:.2g}), {s['verdict']}"

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


# -- black-box: the run's input canaries ----------------------------------------------------------------


# Transforms that keep a canary's difficulty (edges, contrast) but give an image never trained on: the model's loss on
# them is each canary's own reference. A horizontal flip is left out: it is a common training augmentation.
REFERENCE_TRANSFORMS = (lambda x: x.flip(-2), lambda x: x.transpose(-1, -2), lambda x: x.rot90(1, (-2, -1)))


@torch.no_grad()
def canary_scores(model: Any, images: torch.Tensor, cond: Any, loss_timesteps: Sequence[int], noise_draws: int,
                  pia_t: int | None, seed: int, batch_size: int = 256, reference: bool = True) -> dict[str, torch.Tensor]:
    """Membership scores of the canaries (higher: more likely trained on), one vector per score kind.

    ``loss@t``: the DDPM loss at t (Matsumoto et al. 2023; Carlini et al. 2023) averaged over ``noise_draws``
    fixed noises, negated. ``loss@t-ref`` (``reference``): the same minus its mean over the canary's vertical flip,
    transpose and rotation, images as hard as the canary that no one trained on: a per-example difficulty
    calibration without reference models, in the spirit of neighbourhood attacks (Mattern et al. 2023).
    ``pia``: PIA's proximal-initialization score (Kong et al. 2024). ``images`` are pixels in [0, 1] (square),
    ``cond`` the canaries' conditioning (captions for text models).
    """
    def loss(pixels: torch.Tensor) -> torch.Tensor:
        x = model.encode(pixels.to(model.device))
        total = torch.zeros(len(pixels), len(loss_timesteps))
        for draw in range(noise_draws):
            noise = attack_noise(x.cpu(), seed=seed + draw)
            total += loss_scores(model, x, cond, loss_timesteps, noise=noise, batch_size=batch_size)
        return total / noise_draws

    out: dict[str, torch.Tensor] = {}
    if loss_timesteps:
        own = loss(images)
        out.update({f"loss@t{t}": own[:, j] for j, t in enumerate(loss_timesteps)})
        if reference:
            ref = sum(loss(transform(images)) for transform in REFERENCE_TRANSFORMS) / len(REFERENCE_TRANSFORMS)
            out.update({f"loss@t{t}-ref": own[:, j] - ref[:, j] for j, t in enumerate(loss_timesteps)})
    if pia_t is not None:
        out["pia"] = pia_scores(model, model.encode(images.to(model.device)), cond, t=pia_t, batch_size=batch_size)
    return out


class CanaryAudit(AuditPlugin):
    """The one-run epsilon lower bound from the run's input canaries (``data.canaries``), a black-box audit of the
    whole pipeline: data, defenses, training, export. Beside the accountant's epsilon when the run claims one;
    for an undefended run it is the empirical epsilon of the model on these canaries.

    Args:
        confidence: 1 - beta of the bound, shared (union bound) over every score and every (k+, k-) tried.
        loss_timesteps: timesteps of the loss score; noise_draws: noises averaged per canary.
        reference: also score each loss against the canary's flips (``loss@t-ref``, see :func:`canary_scores`).
        pia_t: PIA's timestep (None: no PIA score).
        delta: the delta of the bound where the run claims no (epsilon, delta); a DP run's own delta otherwise.
    """

    name = "canaries"
    needs_samples = False

    def __init__(self, confidence: float = 0.95, loss_timesteps: list[int] = [25, 100], noise_draws: int = 8,
                 reference: bool = True, pia_t: int | None = None, delta: float = 1e-5) -> None:
        if not 0 < confidence < 1:
            raise ValueError(f"canaries confidence must be in (0, 1), got {confidence}")
        if noise_draws < 1:
            raise ValueError(f"canaries noise_draws must be >= 1, got {noise_draws}")
        if not loss_timesteps and pia_t is None:
            raise ValueError("canaries needs at least one score: loss_timesteps or pia_t")
        self.confidence, self.loss_timesteps, self.noise_draws = confidence, list(loss_timesteps), noise_draws
        self.pia_t, self.delta, self.reference = pia_t, delta, reference

    def run(self, context: AuditContext) -> SummaryResult | None:
        data, model = context.data, context.model
        if data.canaries is None or data.canary_included is None:
            return None
        if not model.has_noise_predictor:
            return SummaryResult({"not_applicable": "the canaries' scores are the model's denoising losses, and this model "
                                                    "has no noise predictor"})
        claimed = context.claimed.get("epsilon") if context.claimed else None
        delta = float(context.claimed["delta"]) if claimed is not None else self.delta
        beta = 1 - self.confidence
        scores = canary_scores(model, data.canaries.unit(), table_condition(data.canaries, model), self.loss_timesteps,
                               self.noise_draws, self.pia_t, context.seed, context.batch_size, self.reference)
        included = data.canary_included.bool()
        found = guesses_bound(scores, included, beta, delta)
        top = ceiling(found["m"], beta, delta, score_kinds=len(scores))
        verdict = claim_verdict(found["epsilon"], claimed, top)
        # the figure's score: the one that gave the bound, or (no bound) the first calibrated one, the same across settings
        shown = found["score"] if found["epsilon"] > 0 else next((k for k in scores if k.endswith("-ref")), found["score"])
        chosen = scores[shown]
        train_rows = int(data.copies.sum()) + int(included.sum())
        summary = {
            **found, "kind": "input canaries", "confidence": self.confidence, "delta": delta, "claimed_epsilon": claimed,
            "claim_holds": context.claimed.get("holds") if context.claimed else None, "ceiling": top, "verdict": verdict,
            "included": int(included.sum()), "training_share": int(included.sum()) / max(train_rows, 1),
            "score_kinds": sorted(scores), "shown_score": shown, "scores": chosen.tolist(), "is_included": included.tolist(),
            "auc": mia_stats.auc(chosen.double().numpy(), included.numpy()),
        }
        return CanaryResult(summary)

    @classmethod
    def figures(cls, runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Any]]:
        """The canaries' scores, trained-on ones against the others, one panel per setting (canaries only: never members)."""
        drawn = setting_panels(runs, cls.name, 3.0)
        if drawn is None:
            return []
        fig, panels = drawn
        for ax, name, s in panels:
            scores, inside = np.asarray(s["scores"]), np.asarray(s["is_included"], dtype=bool)
            bins = np.linspace(scores.min(), scores.max(), 25) if np.ptp(scores) > 0 else 10
            ax.hist(scores[inside], bins=bins, alpha=0.6, color="tab:red", label=f"canary, trained on ({inside.sum()})")
            ax.hist(scores[~inside], bins=bins, alpha=0.6, color="tab:grey", label=f"canary, left out ({(~inside).sum()})")
            ax.set_xlabel(f"{s.get('shown_score', s['score'])} (higher: guessed in)", fontsize=8)
            ax.set_title(f"{name}: ε ≥ {s['epsilon']:.2g} (AUC {s['auc']:.2f})" if "auc" in s else f"{name}: ε ≥ {s['epsilon']:.2g}", fontsize=9)
            ax.legend(fontsize=7)
        return [("input canaries: scores of the trained-on and left-out canaries", fig)]


class CanaryResult(SummaryResult):
    def columns(self) -> list[Column]:
        # no privacy role, as the white-box bound: a statement about the mechanism, not leakage of the members
        return [Column("canary_epsilon", "ε lower bound (input canaries)", "", self.summary["epsilon"], bound_cell(self.summary))]

    def verdict(self) -> str | None:
        s = self.summary
        if s["claimed_epsilon"] is None:
            return f"input canaries: empirical ε ≥ {s['epsilon']:.2g} (ceiling {s['ceiling']:.2g}, no DP claim)"
        return f"input canaries: ε ≥ {s['epsilon']:.2g} (ceiling {s['ceiling']:.2g}), {s['verdict']}"

    def scalars(self) -> dict[str, float]:
        return {"canary_epsilon": self.summary["epsilon"], "canary_ceiling": self.summary["ceiling"]}

    def notes(self) -> list[str]:
        s = self.summary
        head = (f"Black-box one-run audit (Steinke et al. 2023) with {s['m']} input canaries ({s['included']} trained on, "
                f"{s['training_share']:.0%} of the training rows; never counted as members): {s['right']} of "
                f"{s['guesses']} guesses right by {s['score']} (k+ {s['k_plus']}, k- {s['k_minus']}, the best of "
                f"{s['choices']} choices over {len(s['score_kinds'])} scores, each at beta/{s['choices']}), epsilon >= "
                f"{s['epsilon']:.3g} at {s['confidence']:.0%} confidence (delta {s['delta']:.3g})")
        if s["claimed_epsilon"] is None:
            text = (head + f". The run claims no DP guarantee: this is an empirical epsilon of the model on these "
                    f"canaries, and the most {s['m']} canaries can show is {s['ceiling']:.3g}.")
        else:
            text = (head + f" against the accountant's {s['claimed_epsilon']:.3g}: {s['verdict']}. Input canaries give "
                    f"loose bounds (the model sees each at most a few times); with {s['m']} no run can show more than "
                    f"{s['ceiling']:.3g}, and a bound below the claim certifies nothing.")
            if s["verdict"] == "VIOLATED":
                text += (" The pipeline leaks more than it reports: check what trains outside DP-SGD (a text encoder, "
                         "a pretraining stage on the private data) and how often each image appears.")
        return [text]
