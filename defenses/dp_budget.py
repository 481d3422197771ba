"""DP-SGD's privacy budget: the steps taken, as an Opacus accountant's (sigma, q, steps) history, the epsilon they
spend, the noise planned for a target, the step after which a budget would be exceeded, and the history a
checkpoint brings back.

The accountant (PRV, Gopi et al. 2021, or RDP, Mironov 2017) is Opacus's; what is added here is book-keeping that
Opacus leaves to its caller: an epsilon cache keyed by the history (a PRV evaluation takes ~0.3 s), the last step
count within a budget found once by search instead of at every step, released steps counted again on a resume, and
a resume refused when its privacy settings differ from the checkpoint's (the weights carry every earlier step, so
the spent history is composed with the new one, never reset).
"""

from __future__ import annotations

import math
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

__all__ = ["PrivacyLedger", "plan_noise", "saved_history"]

History = list[tuple[float, float, int]]


def plan_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The noise multiplier sigma at which ``steps`` Poisson steps at ``sample_rate`` spend at most ``target_epsilon``."""
    try:
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                     steps=steps, accountant=accountant)
    except ValueError as err:
        raise ValueError(
            f"dp_sgd cannot reach target_epsilon={target_epsilon} at delta={delta:g} in {steps} steps at sample rate "
            f"{sample_rate:.4g} ({err}); raise target_epsilon or lower the steps"
        ) from err
    return float(sigma)


class PrivacyLedger:
    """The DP steps of a run and their epsilon at ``delta`` by the named accountant (``prv`` or ``rdp``)."""

    def __init__(self, accountant: str, delta: float) -> None:
        self.accountant_name, self.delta = accountant, float(delta)
        self.accountant = create_accountant(accountant)
        self._epsilon_cache: tuple[tuple, float] | None = None
        self._ok_until: int | None = None  # total steps verified to stay within the budget

    @property
    def steps(self) -> int:
        """DP steps accounted so far."""
        return int(sum(h[2] for h in self.accountant.history))

    @property
    def history(self) -> History:
        return [tuple(h) for h in self.accountant.history]

    def replace_history(self, history: History) -> None:
        """Set the history (a restored checkpoint, or released steps counted again) and forget what was derived from it."""
        self.accountant.history = [tuple(h) for h in history]
        self.changed()

    def changed(self) -> None:
        """The noise or the sample rate changed: the steps verified within the budget must be found again."""
        self._ok_until = None
        self._epsilon_cache = None

    def count_again(self, steps: int, sigma: float | None, sample_rate: float | None) -> None:
        """Count ``steps`` released steps a resume trains again, at the sigma and sample rate they ran with.

        Those are the history's last; ``sigma`` and ``sample_rate`` (this run's) serve only when the history is empty.
        """
        history = self.history
        if history:
            sigma, sample_rate, _ = history[-1]
        elif sigma is None or sample_rate is None:
            raise ValueError(
                f"dp_sgd: {steps} steps after this checkpoint were already released, and the checkpoint holds no DP step to "
                "tell their sigma and sample rate: resume from the run's last checkpoint (--ckpt_path last), or start a new run"
            )
        history.append((sigma, sample_rate, int(steps)))
        self.replace_history(history)

    def with_steps(self, sigma: float, sample_rate: float, extra_steps: int) -> History:
        """The history after ``extra_steps`` more steps at ``sigma`` and ``sample_rate``."""
        history = self.history
        if extra_steps > 0:
            step = (sigma, sample_rate)
            if history and tuple(history[-1][:2]) == step:
                history[-1] = (*step, history[-1][2] + extra_steps)
            else:
                history.append((*step, extra_steps))
        return history

    def epsilon_of(self, history: History) -> float:
        """Epsilon of ``history`` at this ledger's delta (0 for no step)."""
        if not history or sum(h[2] for h in history) == 0:
            return 0.0
        accountant = create_accountant(self.accountant_name)
        accountant.history = [tuple(h) for h in history]
        return float(accountant.get_epsilon(delta=self.delta))

    def epsilon(self) -> float:
        """Epsilon spent so far (0 before the first step)."""
        key = tuple(self.history)
        if self._epsilon_cache is None or self._epsilon_cache[0] != key:
            self._epsilon_cache = (key, self.epsilon_of(list(key)))
        return self._epsilon_cache[1]

    def over_budget_next(self, budget: float, sigma: float, sample_rate: float, planned: int | None) -> float | None:
        """None when one more step keeps epsilon within ``budget``; else the epsilon that step would spend."""
        done = self.steps
        if self._ok_until is None or done + 1 > self._ok_until:
            self._ok_until = self._last_step_within(budget, sigma, sample_rate, planned)
        if done + 1 <= self._ok_until:
            return None
        return self.epsilon_of(self.with_steps(sigma, sample_rate, 1))

    def _last_step_within(self, budget: float, sigma: float, sample_rate: float, planned: int | None) -> int:
        """The largest total step count whose epsilon stays within ``budget`` (more steps at this sigma and q).

        Epsilon grows with steps, so steps up to the returned count need no further check. The search stops at the
        planned steps when they fit (a run usually ends there).
        """
        done = self.steps

        def fits(total: int) -> bool:
            return self.epsilon_of(self.with_steps(sigma, sample_rate, total - done)) <= budget

        if planned and planned > done + 1 and fits(planned):
            return planned
        if not fits(done + 1):
            return done
        lo, width = done + 1, 1
        while True:  # exponential search for a count over the budget, then bisection
            hi = lo + width
            if hi - done > 10**7:
                return hi
            if not fits(hi):
                break
            lo, width = hi, 2 * width
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def state_dict(self) -> dict[str, Any]:
        """Opacus's accountant state: ``{"history": [(sigma, q, steps)], "mechanism"}``."""
        return dict(self.accountant.state_dict())

    @staticmethod
    def read_state(saved: dict[str, Any]) -> tuple[str, History]:
        """The mechanism and history of a saved accountant state, validated by Opacus."""
        spent = create_accountant(saved["mechanism"])
        spent.load_state_dict(saved)
        return saved["mechanism"], [(float(s), float(q), int(n)) for s, q, n in spent.history]


def saved_history(
    state: dict[str, Any], *, num_examples: int | None, sample_rate: float | None, delta: float, accountant: str,
    noise_multiplier: float | None, target_epsilon: float | None, new_budget: bool,
) -> History:
    """The (sigma, q, steps) history of a saved DP-SGD state, validated by Opacus.

    Raises ``ValueError`` when the saved data size, sample rate, delta, accountant, sigma (fixed-noise runs) or
    target epsilon differ from this run's, unless ``new_budget``: then the history is returned to be composed
    with the new settings.
    """
    mechanism, history = PrivacyLedger.read_state(state["accountant"])
    changes = []
    if num_examples is not None and state.get("num_examples") not in (None, num_examples):
        changes.append(f"training rows {state['num_examples']} -> {num_examples}")
    if sample_rate is not None and state.get("sample_rate") is not None and not math.isclose(state["sample_rate"], sample_rate, rel_tol=1e-12):
        changes.append(f"sample rate {state['sample_rate']:.6g} -> {sample_rate:.6g}")
    if not math.isclose(state.get("delta", delta), delta, rel_tol=1e-12):
        changes.append(f"delta {state['delta']:g} -> {delta:g}")
    if mechanism != accountant:
        changes.append(f"accountant {mechanism} -> {accountant}")
    saved_sigma = state.get("noise_multiplier")
    if target_epsilon is None and saved_sigma is not None and not math.isclose(saved_sigma, noise_multiplier, rel_tol=1e-12):
        changes.append(f"noise_multiplier {saved_sigma:g} -> {noise_multiplier:g}")
    if target_epsilon is not None and state.get("target_epsilon") not in (None, target_epsilon):
        changes.append(f"target_epsilon {state['target_epsilon']:g} -> {target_epsilon:g}")
    if changes and not new_budget:
        raise ValueError(
            f"dp_sgd: the checkpoint's privacy settings differ from this run's ({'; '.join(changes)}). "
            "Resume with the original settings, or set dp_sgd new_budget: true to compose the spent "
            f"history ({sum(h[2] for h in history)} steps) with the new settings (epsilon is not reset)"
        )
    return history
