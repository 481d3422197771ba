"""White-box gradient canaries in the DP-SGD step: the evidence for a one-run audit of the step itself.

Steinke, Nasr and Jagielski (NeurIPS 2023, "Privacy Auditing with One (1) Training Run"): m canaries, each in the
training independently with probability 1/2, are scored after one run; how many of the inclusions a guesser gets
right bounds epsilon from below (``privdiff.eval.one_run``). A gradient canary is a fixed per-example gradient of
norm C: here a Dirac, C at one coordinate of one parameter tensor and 0 elsewhere, which every correct clipping leaves
as it is. The canaries are spread round-robin over the trainable tensors (a tensor that escapes the noise then holds
some of them) and enter where a sampled example's clipped gradient does, after the clipping and before the noise,
each included one Poisson-sampled at the run's rate q at every step like an example.

The canaries' coordinates are reserved: the training rows' clipped sum is zeroed there (a fixed projection of
every clipped gradient, which keeps its norm <= C, so the mechanism and its epsilon are unchanged, and training
loses m coordinates of the model). What the run releases there is then the canaries' sum plus the noise, and the
score of canary i is what an observer of every step's noisy gradient reads: ``x_t = released_t[i] * B / C`` summed
over the steps, with B the expected batch. Per canary the sum and the sum of squares of ``x_t`` are kept (and
checkpointed), so the audit can standardize each canary by the noise its own coordinate really carried.

The inclusion draw and the per-step sampling come from fresh OS entropy (``DPRandomness``), independent of the run's
seed, the data and the DP noise; the inclusion is kept for the auditor in the run's ``defenses.json``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["GradientCanaries"]


class GradientCanaries:
    """``count`` Dirac gradient canaries of norm ``max_grad_norm`` over ``params``; see the module's docstring.

    Args:
        count: m, the number of canaries (each costs one coordinate of the model and nothing per example).
        generator: a CPU generator from fresh entropy (never the run's seed): the inclusion, the coordinates and the
            per-step sampling are drawn from it.
    """

    def __init__(self, count: int, generator: torch.Generator) -> None:
        if count < 1:
            raise ValueError(f"gradient canaries: count must be >= 1, got {count}")
        self.count = int(count)
        self.generator = generator
        self.included = torch.rand(self.count, generator=generator) < 0.5
        self.sums = torch.zeros(self.count, dtype=torch.float64)
        self.squares = torch.zeros(self.count, dtype=torch.float64)
        self.steps = 0
        self.tensor_of: torch.Tensor | None = None  # (m,) which trainable tensor each canary sits in
        self.index_of: torch.Tensor | None = None  # (m,) its flat coordinate there
        self.tensor_names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._sampled: torch.Tensor | None = None
        self._groups: list | None = None
        self.sample_rate = 0.0

    # -- placement ------------------------------------------------------------------------------------
    def place(self, params: list[nn.Parameter], names: list[str]) -> None:
        """Spread the canaries over ``params`` (round-robin, a distinct random coordinate each)."""
        sizes = [p.numel() for p in params]
        if not sizes or sum(sizes) < self.count:
            raise ValueError(f"gradient canaries: {self.count} canaries need as many coordinates; the trainable "
                             f"parameters hold {sum(sizes)}: lower gradient_canaries")
        if self.tensor_of is not None:  # restored from a checkpoint: the same places
            if len(params) != len(self.tensor_names):
                raise ValueError("gradient canaries: the checkpoint's canaries sit in tensors this model does not have")
            self._params = list(params)
            self._groups = None
            return
        # round-robin: one canary per tensor in turn, skipping the tensors already full
        counts = [0] * len(params)
        for _ in range(self.count):
            k = min((k for k in range(len(params)) if counts[k] < sizes[k]), key=lambda k: counts[k])
            counts[k] += 1
        tensor_of = [k for k, n in enumerate(counts) for _ in range(n)]
        index_of = [torch.randperm(sizes[k], generator=self.generator)[:n] for k, n in enumerate(counts)]
        self.tensor_of, self.index_of = torch.tensor(tensor_of), torch.cat(index_of)
        self.tensor_names = list(names)
        self._params = list(params)
        self._groups = None

    def attach(self, optimizer: Any, sample_rate: float) -> None:
        """Add the canaries to ``optimizer`` (privdiff's clipping DPOptimizer) and read them from its noisy steps."""
        self.sample_rate = float(sample_rate)
        optimizer.add_clipped_sum_hook(self._inject)
        earlier = optimizer.step_hook  # the accountant's: Opacus keeps one hook, so both run from here

        def step_hook(opt: Any) -> None:
            if earlier is not None:
                earlier(opt)
            self._read(opt)

        optimizer.step_hook = step_hook

    # -- each step ---------------------------------------------------------------------------------------
    def _by_tensor(self) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
        """(parameter, its canaries' rows, their flat coordinates) of every tensor holding canaries, found once."""
        if self._groups is None:
            self._groups = []
            for k, p in enumerate(self._params):
                rows = (self.tensor_of == k).nonzero().squeeze(1)
                if len(rows):
                    self._groups.append((p, rows, self.index_of[rows].to(p.device)))
        return self._groups

    def _inject(self, optimizer: Any) -> None:
        """Zero the reserved coordinates of the clipped sums and put in the canaries sampled this step."""
        skipped = bool(getattr(optimizer, "step_skip_queue", None)) and bool(optimizer.step_skip_queue[0])
        sampled = self.included & (torch.rand(self.count, generator=self.generator) < self.sample_rate) if not skipped else None
        for p, rows, index in self._by_tensor():
            if p.summed_grad is None:
                continue
            flat = p.summed_grad.view(-1)
            # reserved: the training rows' clipped sum never reaches these coordinates; a sampled canary's C does
            flat[index] = 0 if sampled is None else sampled[rows].to(flat.device, flat.dtype) * optimizer.max_grad_norm
        self._sampled = sampled

    def _read(self, optimizer: Any) -> None:
        """Add this step's release at each canary, in units of C per example (the sum the optimizer averaged)."""
        if self._sampled is None:
            return
        released = torch.empty(self.count, dtype=torch.float64)
        for p, rows, index in self._by_tensor():
            released[rows] = p.grad.reshape(-1)[index].double().cpu()
        x = released * optimizer.expected_batch_size / optimizer.max_grad_norm  # privdiff never accumulates DP batches
        self.sums += x
        self.squares += x * x
        self.steps += 1
        self._sampled = None

    # -- the record ------------------------------------------------------------------------------------
    def evidence(self) -> dict[str, Any]:
        """What the auditor reads (plain JSON): the inclusion, each canary's sums, its tensor, the steps and the rate."""
        return {
            "kind": "white-box gradient canaries (Dirac, norm C, after clipping, before the noise)",
            "count": self.count, "steps": self.steps, "sample_rate": self.sample_rate,
            "included": self.included.tolist(), "sums": self.sums.tolist(), "squares": self.squares.tolist(),
            "tensor": [] if self.tensor_of is None else self.tensor_of.tolist(), "tensor_names": self.tensor_names,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"included": self.included.clone(), "sums": self.sums.clone(), "squares": self.squares.clone(),
                "steps": self.steps, "tensor_of": self.tensor_of, "index_of": self.index_of, "tensor_names": self.tensor_names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["included"]) != self.count:
            raise ValueError(f"gradient canaries: the checkpoint has {len(state['included'])} canaries, this run {self.count}")
        self.included, self.sums, self.squares = state["included"].clone(), state["sums"].clone(), state["squares"].clone()
        self.steps, self.tensor_of, self.index_of = int(state["steps"]), state["tensor_of"], state["index_of"]
        self.tensor_names = list(state["tensor_names"])
        self._groups = None
