"""Wen et al.'s inference-time mitigation of memorization for text-to-image models.

Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models" (ICLR
2024), Sec. 4.2: a memorized prompt shows as a large difference between the text-conditional and
the unconditional noise prediction (their detection magnitude). Before sampling, the prompt's
embedding is moved by gradient descent (Adam) to lower that magnitude at the first step, and
optimization stops for a prompt once its magnitude is below a target: a prompt that is not
memorized is left (almost) as it is, a memorized one loses what triggers the copy.

It gives NO differential-privacy guarantee and does not change the weights: membership inference is
untouched, and whoever has the weights (or samples without privdiff) gets the memorized images.
Written here because no maintained library implements it for diffusers models (the authors' code
patches a Stable Diffusion pipeline); the steps follow the paper's description, not that code.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Defense, GenerationContext

DISCLAIMER = "no DP guarantee; the weights still memorize (membership inference unchanged)"


class PromptMitigationDefense(Defense):
    """Lowers each prompt's noise-difference magnitude below ``target`` before sampling (Wen et al. 2024).

    Args:
        target: the magnitude (RMS of eps(x_T, e) - eps(x_T, e_empty) over the latent) to bring a prompt
            under; None takes it from captions of non-member images the sampler is given
            (``GenerationContext.public_prompts``, the audit's held-out calibration captions): their
            ``target_quantile``.
        target_quantile: which quantile of the public prompts' magnitudes is the target (0.25: under three in
            four non-member captions).
        lr: Adam's step size on the embedding (Wen et al.: 0.05).
        max_steps: gradient steps at most per batch of prompts.
        probes: start noises the magnitude is averaged over in each step (fresh ones every step), at timesteps
            spread evenly over the first ``depth`` of the trajectory (from T - 1 down to (1 - depth) T).
    """

    name = "prompt_mitigation"
    order = 30

    def __init__(self, target: float | None = None, target_quantile: float = 0.25, lr: float = 0.05, max_steps: int = 20,
                 probes: int = 4, depth: float = 0.3) -> None:
        if target is not None and not target > 0:
            raise ValueError(f"prompt_mitigation target must be > 0 (or null: from public prompts), got {target}")
        if not 0 < target_quantile < 1 or not lr > 0 or max_steps < 1 or probes < 1:
            raise ValueError("prompt_mitigation needs 0 < target_quantile < 1, lr > 0, max_steps >= 1 and probes >= 1, got "
                             f"{target_quantile}, {lr}, {max_steps}, {probes}")
        self.target, self.target_quantile, self.lr, self.max_steps, self.probes = target, target_quantile, lr, max_steps, probes
        self.depth = float(depth)
        self._target: float | None = target
        self.prompts = self.adjusted = self.steps_taken = self.calls = 0

    # -- the magnitude ----------------------------------------------------------------------
    def _magnitude(self, model: Any, emb: torch.Tensor, empty_eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(P,) mean over probes of the RMS difference of conditional and unconditional predictions."""
        p = emb.shape[0]
        eps = model.predict_noise(x, t, emb.repeat_interleave(self.probes, 0)).float()
        self.calls += len(x)
        return (eps - empty_eps).flatten(1).pow(2).mean(1).sqrt().view(p, self.probes).mean(1)

    def _probe(self, model: Any, p: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn((p * self.probes, *model.latent_shape), generator=generator).to(model.device)
        # Probes over the first 30% of the trajectory: lowering the magnitude at t = T - 1 alone (Wen et al.'s first
        # step) left the copies of a model that samples without guidance, as the demo's does.
        top = model.num_train_timesteps - 1
        spread = torch.linspace(top, top * (1 - self.depth), self.probes).round().long()
        t = spread.repeat(p).to(model.device)
        with torch.no_grad():
            empty = model.condition_embedding([""]).expand(len(x), -1, -1)  # one blank prompt's embedding for every probe
            empty_eps = model.predict_noise(x, t, empty).float()
        self.calls += len(x)
        return x, t, empty_eps

    def _resolve_target(self, model: Any, context: GenerationContext, generator: torch.Generator) -> float:
        if self._target is not None:
            return self._target
        public = list(dict.fromkeys(context.public_prompts or []))
        if not public:
            raise ValueError("prompt_mitigation takes its target from captions of non-member images, and the sampler got "
                             "none: audit with held-out images (data.num_heldout > 0) or set prompt_mitigation.target")
        with torch.no_grad():
            x, t, empty_eps = self._probe(model, len(public), generator)
            mags = self._magnitude(model, model.condition_embedding(public), empty_eps, x, t)
        self._target = float(torch.quantile(mags.cpu(), self.target_quantile))
        return self._target

    def check_model(self, model: Any) -> None:
        if getattr(model, "conditioning", None) != "text":
            raise ValueError(f"prompt_mitigation adjusts the prompts of a text-to-image model; {type(model).__name__} is "
                             f"conditioned on {getattr(model, 'conditioning', None)!r}: drop configs/defense/prompt_mitigation.yaml "
                             "or use a text-to-image model (configs/model/t2i_tiny.yaml)")

    # -- the hook ---------------------------------------------------------------------------
    def adjust_condition(self, model: Any, cond: Any, generator: torch.Generator, context: GenerationContext) -> Any:
        if not (isinstance(cond, (list, tuple)) and cond and isinstance(cond[0], str)):
            raise ValueError("prompt_mitigation adjusts the prompts of a text-to-image model; this model samples from "
                             f"{type(cond).__name__} conditioning: drop the defense for it")
        if model.condition_embedding(cond[:1]) is None:
            raise ValueError(f"prompt_mitigation needs a model with a prompt embedding; {type(model).__name__} has none")
        # Its own noise, seeded from the batch's seed: the sampler's generator is left as it is.
        own = torch.Generator().manual_seed(generator.initial_seed() ^ 0x5EED)
        target = self._resolve_target(model, context, own)
        unique = list(dict.fromkeys(cond))
        with torch.enable_grad():
            emb = model.condition_embedding(unique).detach().clone().requires_grad_(True)
            x, t, empty_eps = self._probe(model, len(unique), own)
            opt = torch.optim.Adam([emb], lr=self.lr)
            touched = torch.zeros(len(unique), dtype=torch.bool, device=emb.device)
            for step in range(self.max_steps):
                if step:  # fresh start noises every step: lowering the magnitude for a few fixed ones did not remove copies
                    x, t, empty_eps = self._probe(model, len(unique), own)
                mags = self._magnitude(model, emb, empty_eps, x, t)
                active = mags.detach() > target
                if not bool(active.any()):
                    break
                touched |= active
                before = emb.detach().clone()
                opt.zero_grad(set_to_none=True)
                (mags.pow(2) * active).sum().backward(inputs=[emb])
                self.calls += 2 * int(active.sum()) * self.probes  # the backward pass costs about two forward calls
                opt.step()
                with torch.no_grad():
                    emb[~active] = before[~active]  # a prompt under the target is not moved
                self.steps_taken += 1
        self.prompts += len(unique)
        self.adjusted += int(touched.sum())
        row = {p: i for i, p in enumerate(unique)}
        return emb.detach()[[row[p] for p in cond]]

    # -- reporting --------------------------------------------------------------------------
    def metrics(self) -> dict[str, float | int | str]:
        return {
            "prompts": self.prompts, "adjusted": self.adjusted, "steps": self.steps_taken,
            "noise_predictor_calls": self.calls, "target": self._target if self._target is not None else float("nan"),
            "guarantee": DISCLAIMER,
        }

    def describe(self) -> str:
        return "prompt_mitigation(Wen et al.)"
