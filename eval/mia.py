"""Membership inference against diffusion models: attacks as pure functions, and the audit of their scores.

Every attack returns one score per example, *higher = more likely a member*, and does no I/O. ``audit`` turns
scores and the membership labels of the run's manifest into ROC AUC and TPR at low FPR (Carlini et al. 2022,
"Membership Inference Attacks From First Principles": report the low-FPR regime, not only AUC).

Attacks (white-box: they query the noise predictor ``eps_theta``):

- ``loss_scores``: loss threshold at fixed timesteps (Matsumoto et al. 2023; Carlini et al. 2023);
- ``pia_scores``: PIA, proximal initialization (Kong et al., ICLR 2024);
- ``secmi_scores``: SecMI-stat, the t-error of a deterministic DDIM round trip (Duan et al., ICML 2023).

Conventions shared by all attacks: images are in [-1, 1] (the model's space); timestep indices follow the
training scheduler, so "t = 0" is the first noise level, ``abar_0 = alphas_cumprod[0]`` (as in the authors'
code, which also indexes the DDPM schedule from 0); ``||v||^2`` is the sum of squares over all pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc, binary_roc
from tqdm.auto import tqdm

from privdiff.model import DiffusionModel

from .plugin import AuditContext, AuditPlugin, AuditResult, Column, Privacy, setting_panels, table_condition

DEFAULT_TIMESTEPS: tuple[int, ...] = (10, 25, 50, 100, 200, 300, 500)


# -- audit --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MIAResult:
    """ROC summary of one attack: AUC and the TPR at 1% and 0.1% FPR."""

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    num_members: int
    num_nonmembers: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _as_1d(name: str, values) -> Tensor:
    t = torch.as_tensor(values).detach().cpu()
    if t.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one value per example), got shape {tuple(t.shape)}")
    return t


def _rank_transform(scores: Tensor) -> Tensor:
    """Map scores monotonically onto [0, 1], ties kept (dense ranks).

    torchmetrics treats predictions outside [0, 1] as logits and applies a sigmoid; in float32 that saturates
    for |score| above ~100 (typical for summed squared errors) and turns distinct scores into ties, which
    silently corrupts the ROC. Ranks carry the same ordering, which is all a ROC depends on.
    """
    uniq, inverse = torch.unique(scores.double(), sorted=True, return_inverse=True)
    if uniq.numel() == 1:
        return torch.full_like(scores, 0.5, dtype=torch.float64)
    return inverse.double() / (uniq.numel() - 1)


def audit(scores: Tensor | Sequence[float], is_member: Tensor | Sequence[bool]) -> MIAResult:
    """Return ROC AUC and TPR at 1% / 0.1% FPR of membership ``scores`` (higher = member), via torchmetrics.

    TPR at an FPR level is the largest TPR among ROC points whose FPR is at most that level; with fewer than
    1000 non-members, "0.1% FPR" can only be met at FPR = 0.
    """
    s = _as_1d("scores", scores)
    m = _as_1d("is_member", is_member)
    if s.numel() != m.numel():
        raise ValueError(f"scores and is_member must have the same length, got {s.numel()} and {m.numel()}")
    if not s.is_floating_point():
        s = s.double()
    if not torch.isfinite(s).all():
        raise ValueError(f"scores contain {int((~torch.isfinite(s)).sum())} NaN or infinite values")
    if m.dtype != torch.bool:
        if not torch.isin(m, torch.tensor([0, 1], dtype=m.dtype)).all():
            raise ValueError("is_member must be boolean or 0/1")
        m = m.bool()
    n_mem, n_non = int(m.sum()), int((~m).sum())
    if n_mem == 0 or n_non == 0:
        raise ValueError(
            f"the audit needs both members and non-members, got {n_mem} members and {n_non} non-members"
        )
    preds, target = _rank_transform(s), m.long()
    fpr, tpr, _ = binary_roc(preds, target)
    auc = binary_auroc(preds, target)

    def tpr_at(level: float) -> float:
        ok = fpr <= level + 1e-12
        return float(tpr[ok].max()) if ok.any() else 0.0

    return MIAResult(
        auc=float(auc),
        tpr_at_1pct_fpr=tpr_at(0.01),
        tpr_at_0_1pct_fpr=tpr_at(0.001),
        num_members=n_mem,
        num_nonmembers=n_non,
    )


# -- shared plumbing ----------------------------------------------------------------------------------


class _EvalMode:
    """Put a module in eval mode for the duration of a ``with`` block and restore its mode after."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.was_training = module, module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc) -> None:
        self.module.train(self.was_training)


def _check_inputs(model: DiffusionModel, images: Tensor, cond: Tensor | Sequence[str] | None, batch_size: int) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    if cond is not None and len(cond) != images.shape[0]:
        raise ValueError(f"cond (the conditioning) has {len(cond)} entries for {images.shape[0]} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _check_t(name: str, t: int, num_train_timesteps: int, low: int = 0) -> None:
    if not low <= t < num_train_timesteps:
        raise ValueError(f"{name} must be in {low}..{num_train_timesteps - 1}, got {t}")


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    starts = range(0, n, batch_size)
    return tqdm(starts, desc=desc, disable=not progress, total=len(starts))


def _eps(model: DiffusionModel, x: Tensor, t: int, c: object) -> Tensor:
    """eps_theta(x, t, c) with ``c`` already embedded (``model.embed_condition``)."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    return model.predict_noise(x, tt, c).float()


def _embedded(model: DiffusionModel, cond: Tensor | Sequence[str] | None, start: int, batch_size: int, device) -> object:
    """The conditioning of examples ``start:start+batch_size``, embedded once for every query of the batch."""
    if cond is None:
        return model.embed_condition(None)
    part = cond[start : start + batch_size]
    return model.embed_condition(part.to(device) if isinstance(part, Tensor) else list(part))


def _sq_norm(v: Tensor) -> Tensor:
    return v.float().pow(2).flatten(1).sum(1)


# -- loss threshold -----------------------------------------------------------------------------------


def attack_noise(images: Tensor, seed: int = 0) -> Tensor:
    """Return the fixed noise of the loss attack: ``torch.randn(images.shape)`` from a CPU generator seeded
    with ``seed`` (one draw per example, independent of batch size and device)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(images.shape), generator=g, dtype=torch.float32)


@torch.no_grad()
def loss_scores(
    model: DiffusionModel,
    images: Tensor,
    cond: Tensor | Sequence[str] | None = None,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    seed: int = 0,
    noise: Tensor | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """Return loss-threshold scores ``-||eps - eps_theta(x_t, t)||^2``, shape (N, len(timesteps)).

    Matsumoto et al. 2023 ("Membership Inference Attacks against Diffusion Models", loss-based attack) and
    Carlini et al. 2023 ("Extracting Training Data from Diffusion Models", their loss-threshold membership
    inference on CIFAR-10 DDPMs): the DDPM training loss (Ho et
    al. 2020, eq. 14) at a fixed timestep, with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4). Each
    example gets ONE fixed noise ``eps`` (``attack_noise(images, seed)`` unless ``noise`` is given), reused for
    every t, so scores are reproducible and the columns differ only in t.
    """
    _check_inputs(model, images, cond, batch_size)
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise ValueError("timesteps is empty")
    for t in timesteps:
        _check_t("every timestep", t, model.num_train_timesteps)
    if noise is None:
        noise = attack_noise(images, seed)
    elif noise.shape != images.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from images shape {tuple(images.shape)}")
    device = model.device
    out = torch.empty(images.shape[0], len(timesteps), dtype=torch.float32)
    with _EvalMode(model):
        for i in _batches(images.shape[0], batch_size, progress, "loss attack"):
            x0 = images[i : i + batch_size].to(device, torch.float32)
            eps = noise[i : i + batch_size].to(device, torch.float32)
            y = _embedded(model, cond, i, batch_size, device)
            for j, t in enumerate(timesteps):
                x_t = model.add_noise(x0, eps, torch.tensor(t))
                out[i : i + x0.shape[0], j] = -_sq_norm(eps - _eps(model, x_t, t, y)).cpu()
    return out


def best_over_timesteps(
    score_matrix: Tensor, is_member: Tensor | Sequence[bool], timesteps: Sequence[int] | None = None
) -> tuple[Tensor, int]:
    """Return the column of ``score_matrix`` (N, T) with the highest AUC, and its timestep.

    Choosing t with the membership labels is an optimistic, attacker-favourable choice (a real attacker would
    calibrate t on data of known status, e.g. shadow models); the papers report the best t the same way. The
    timestep returned is ``timesteps[j]``, or the column index ``j`` when ``timesteps`` is None; ties go to
    the first column.
    """
    if score_matrix.ndim != 2 or score_matrix.shape[1] == 0:
        raise ValueError(f"score_matrix must have shape (N, T) with T >= 1, got {tuple(score_matrix.shape)}")
    if timesteps is not None and len(timesteps) != score_matrix.shape[1]:
        raise ValueError(f"{len(timesteps)} timesteps for {score_matrix.shape[1]} score columns")
    aucs = [audit(score_matrix[:, j], is_member).auc for j in range(score_matrix.shape[1])]
    best = max(range(len(aucs)), key=lambda j: (aucs[j], -j))
    return score_matrix[:, best], int(timesteps[best]) if timesteps is not None else best


@dataclass(frozen=True)
class LossAttackResult:
    """The loss attack over a scan of timesteps: the audit per t and the best t (chosen with the labels)."""

    per_timestep: dict[int, MIAResult]
    best_timestep: int
    best: MIAResult
    scores: Tensor

    def to_dict(self) -> dict:
        return {
            "best_timestep": self.best_timestep,
            "best": self.best.to_dict(),
            "per_timestep": {str(t): r.to_dict() for t, r in self.per_timestep.items()},
        }


def loss_threshold_attack(
    model: DiffusionModel,
    images: Tensor,
    is_member: Tensor | Sequence[bool],
    cond: Tensor | Sequence[str] | None = None,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
) -> LossAttackResult:
    """Run ``loss_scores`` over ``timesteps``, audit every t and report the best one (see ``best_over_timesteps``
    for why that choice is optimistic)."""
    scores = loss_scores(model, images, cond, timesteps, seed=seed, batch_size=batch_size, progress=progress)
    per_t = {int(t): audit(scores[:, j], is_member) for j, t in enumerate(timesteps)}
    _, best_t = best_over_timesteps(scores, is_member, timesteps)
    return LossAttackResult(per_timestep=per_t, best_timestep=best_t, best=per_t[best_t], scores=scores)


# -- PIA ----------------------------------------------------------------------------------------------


@torch.no_grad()
def pia_scores(
    model: DiffusionModel,
    images: Tensor,
    cond: Tensor | Sequence[str] | None = None,
    t: int = 200,
    p: float = 4,
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """Return PIA scores ``-sum |eps_theta(x0, 0) - eps_theta(x_t, t)|^p``, shape (N,). Deterministic.

    Kong et al., ICLR 2024, "An Efficient Membership Inference Attack for the Diffusion Model by Proximal
    Initialization": the model's own output at t = 0, eps0 = eps_theta(x0, 0), is the proximal initial noise;
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps0, and the attack statistic is
    R_{t,p} = || eps0 - eps_theta(x_t, t) ||_p (members: small). The paper's PIA uses p = 4 and t = 200
    (DDPM). We return -R^p, the p-th power summed over pixels as in the authors' code (``distance``:
    ``(|x0 - x1| ** lp).sum()``); it orders examples exactly as -R_{t,p}, so the ROC is the same.
    """
    _check_inputs(model, images, cond, batch_size)
    _check_t("t", int(t), model.num_train_timesteps, low=1)
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    device = model.device
    out = torch.empty(images.shape[0], dtype=torch.float32)
    with _EvalMode(model):
        for i in _batches(images.shape[0], batch_size, progress, "PIA"):
            x0 = images[i : i + batch_size].to(device, torch.float32)
            y = _embedded(model, cond, i, batch_size, device)
            eps0 = _eps(model, x0, 0, y)
            x_t = model.add_noise(x0, eps0, torch.tensor(int(t)))
            diff = eps0 - _eps(model, x_t, int(t), y)
            out[i : i + x0.shape[0]] = -diff.abs().pow(p).flatten(1).sum(1).cpu()
    return out


# -- SecMI --------------------------------------------------------------------------------------------


def _ddim_move(model: DiffusionModel, x: Tensor, t_from: int, t_to: int, y: object) -> Tensor:
    """One deterministic DDIM step from ``t_from`` to ``t_to`` (either direction), with eps_theta(x, t_from).

    x0_hat = (x - sqrt(1 - abar_from) eps) / sqrt(abar_from);  x' = sqrt(abar_to) x0_hat + sqrt(1 - abar_to) eps
    (Song et al. 2021, DDIM eq. 12 with sigma = 0; Duan et al. 2023 use it both to denoise and to invert).
    """
    abar = model.alphas_cumprod()
    eps = _eps(model, x, t_from, y)
    x0_hat = (x - (1 - abar[t_from]).sqrt() * eps) / abar[t_from].sqrt()
    return abar[t_to].sqrt() * x0_hat + (1 - abar[t_to]).sqrt() * eps


@torch.no_grad()
def secmi_scores(
    model: DiffusionModel,
    images: Tensor,
    cond: Tensor | Sequence[str] | None = None,
    t_sec: int = 100,
    k: int = 10,
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """Return SecMI-stat scores ``-|| psi(phi(x~_t)) - x~_t ||^2`` at t = ``t_sec``, shape (N,). Deterministic.

    Duan et al., ICML 2023, "Are Diffusion Models Vulnerable to Membership Inference Attacks?": with the
    deterministic DDIM reverse (inversion) step phi_theta: x_t -> x_{t+k} and denoising step psi_theta:
    x_{t+k} -> x_t (both ``_ddim_move``), x~_t = Phi_theta(x0, t) is x0 inverted by phi over 0 -> k -> ... ->
    t_sec, and the t-error (the posterior estimation error) is l~_{t,x0} = || psi(phi(x~_t, t), t+k) - x~_t ||^2;
    SecMI-stat thresholds l~_{t_sec,x0} (members: small). Paper settings: t_sec = 100, k = 10.

    Note: the authors' ``secmia.py`` stops the inversion one interval earlier (``range(0, t_sec, k)[1:]``, so
    x~ sits at t_sec - k and the round trip probes t_sec); we follow the paper's definition (x~ at t_sec).
    """
    _check_inputs(model, images, cond, batch_size)
    t_sec, k = int(t_sec), int(k)
    if k < 1:
        raise ValueError(f"k (the DDIM interval) must be >= 1, got {k}")
    if t_sec < k or t_sec % k:
        raise ValueError(f"t_sec must be a positive multiple of k={k}, got {t_sec}")
    _check_t("t_sec + k", t_sec + k, model.num_train_timesteps)
    device = model.device
    out = torch.empty(images.shape[0], dtype=torch.float32)
    with _EvalMode(model):
        for i in _batches(images.shape[0], batch_size, progress, "SecMI"):
            x = images[i : i + batch_size].to(device, torch.float32)
            y = _embedded(model, cond, i, batch_size, device)
            for t in range(0, t_sec, k):  # Phi_theta(x0, t_sec): 0 -> k -> ... -> t_sec
                x = _ddim_move(model, x, t, t + k, y)
            x_up = _ddim_move(model, x, t_sec, t_sec + k, y)  # phi: t_sec -> t_sec + k
            x_back = _ddim_move(model, x_up, t_sec + k, t_sec, y)  # psi: t_sec + k -> t_sec
            out[i : i + x.shape[0]] = -_sq_norm(x_back - x).cpu()
    return out


# -- the audit plugin ---------------------------------------------------------------------------------

MIA_ATTACKS = ("loss", "pia", "secmi")


def check_mia_sizes(num_members: int, num_heldout: int, examples: int | None) -> int:
    """Return how many members (and as many held-out images) membership inference scores.

    Raises ``ValueError`` naming the setting to change when fewer than 2 of either are available.
    """
    n = min(num_members, num_heldout)
    if examples is not None:
        n = min(n, examples)
    if n < 2:
        if num_heldout < 2:
            why = f"at least 2 held-out images, got data.num_heldout={num_heldout}; raise data.num_heldout"
        elif num_members < 2:
            why = f"at least 2 members, got {num_members}; raise data.num_members"
        else:
            why = f"at least 2 examples, got audit.attacks.mia.examples={examples}; raise it"
        raise ValueError(f"membership inference needs {why} (or leave mia out of audit.attacks)")
    return n


@dataclass
class MembershipReport(AuditResult):
    """Each attack's cross-fitted ROC figures with bootstrap intervals, the strongest one, and the ROC points."""

    summary: dict

    def to_dict(self) -> dict:
        return self.summary

    def columns(self) -> list[Column]:
        best = self.summary.get("best")
        if not best:
            return []
        lo, hi = best["auc_interval"]
        tlo, thi = best["tpr_interval"]
        return [
            Column("mia", "best MIA AUC", "ROC AUC of the strongest attack, members vs held-out, chosen on one half of the "
                   "pairs and measured on the other (cross-fitted), with its 95% bootstrap interval", best["auc"],
                   f"{best['auc']:.3f} [{lo:.2f}, {hi:.2f}] ({best['attack']})", Privacy.PRIVACY),
            Column("tpr", "TPR@low FPR", "true-positive rate of that attack at the lowest false-positive rate the held-out "
                   "count resolves (max(1%, 1/n)), with its 95% interval", best["tpr"],
                   f"{best['tpr']:.3g} [{tlo:.2f}, {thi:.2f}] @{best['fpr']:.1%}"),
        ]

    def verdict(self) -> str | None:
        best = self.summary.get("best")
        if not best:
            return None
        lo, hi = best["auc_interval"]
        return f"membership inference: AUC {best['auc']:.2f} [{lo:.2f}, {hi:.2f}] ({best['attack']}), {best['verdict']}"

    def scalars(self) -> dict[str, float]:
        out = {}
        for attack in MIA_ATTACKS:
            if attack in self.summary:
                out[f"mia_{attack}_auc"] = float(self.summary[attack]["auc"])
                out[f"mia_{attack}_tpr_at_low_fpr"] = float(self.summary[attack]["tpr"])
        return out

    def notes(self) -> list[str]:
        notes = ["MIA: each attack's timestep (and the strongest attack) is chosen on one half of the member/held-out "
                 "pairs and its AUC measured on the other half, both ways, and averaged; [intervals] are 95% bootstrap "
                 "intervals. With n held-out images no FPR below 1/n is resolved: the TPR says at which FPR it is taken."]
        for attack in MIA_ATTACKS:
            verdict = (self.summary.get(attack) or {}).get("verdict")
            if verdict == "below chance":
                notes.append(
                    f"MIA {attack}: AUC below chance beyond its interval: members score as *less* member-like than held-out "
                    "images, i.e. the attack's assumption is inverted for this model (SecMI's round-trip error grows on the "
                    "images a model has memorized hardest). Its AUC is reported, not read as privacy."
                )
        return notes


def _verdict(interval: list[float]) -> str:
    lo, hi = interval
    if hi < 0.5:
        return "below chance"
    if lo <= 0.5 <= hi:
        return "chance"
    return "above chance"


class MembershipInference(AuditPlugin):
    """Loss-threshold, PIA and SecMI membership inference against members and as many held-out images.

    Figures are honest about selection and sample size (``privdiff.eval.mia_stats``): the loss
    attack's timestep and the strongest attack are chosen on one half of the pairs and measured on
    the other; AUC and TPR come with 95% bootstrap intervals; TPR is taken at the lowest FPR the
    held-out count resolves.

    Args:
        attacks: which of ``loss``, ``pia``, ``secmi`` run.
        examples: members (and as many held-out images) scored; None: as many as both sets allow.
        loss_timesteps: timesteps the loss attack chooses among.
        pia_t: PIA's timestep (Kong et al.: 200).
        secmi_t, secmi_k: SecMI's timestep and DDIM interval (Duan et al.: 100, 10).
        resamples: bootstrap resamples of the intervals.
    """

    name = "mia"
    needs_samples = False

    def __init__(
        self,
        attacks: list[str] = list(MIA_ATTACKS),
        examples: int | None = None,
        loss_timesteps: list[int] = [10, 50, 100, 200, 300, 500],
        pia_t: int = 200,
        secmi_t: int = 100,
        secmi_k: int = 10,
        resamples: int = 300,
    ) -> None:
        unknown = set(attacks) - set(MIA_ATTACKS)
        if unknown or not attacks:
            raise ValueError(f"membership inference attacks must be a non-empty subset of {MIA_ATTACKS}, got {attacks}")
        self.attacks, self.examples = list(attacks), examples
        self.loss_timesteps, self.pia_t, self.secmi_t, self.secmi_k = list(loss_timesteps), pia_t, secmi_t, secmi_k
        self.resamples = resamples

    def check(self, num_members: int, num_heldout: int) -> None:
        check_mia_sizes(num_members, num_heldout, self.examples)

    def run(self, context: AuditContext) -> MembershipReport:
        from . import mia_stats

        data, model = context.data, context.model
        heldout = context.heldout if context.heldout is not None else data.heldout
        n = check_mia_sizes(len(data.members), len(heldout), self.examples)
        both = type(data.members).concat([data.members.select(range(n)), heldout.select(range(n))])
        with torch.no_grad():
            x = model.encode(both.unit().to(model.device))
        y = table_condition(both, model)
        kw = {"batch_size": context.batch_size, "progress": context.progress}
        stats = {"seed": context.seed, "resamples": self.resamples}
        out: dict = {"num_members": n, "num_nonmembers": n}
        candidates: dict[str, np.ndarray] = {}
        if "loss" in self.attacks:
            matrix = loss_scores(model, x, y, self.loss_timesteps, seed=context.seed, **kw).double().numpy()
            by_t = {f"loss@t{t}": matrix[:, j] for j, t in enumerate(self.loss_timesteps)}
            candidates.update(by_t)
            fitted = mia_stats.crossfit(by_t, n, **stats)
            member = np.arange(2 * n) < n
            out["loss"] = {**fitted, "per_timestep_auc": {str(t): mia_stats.auc(matrix[:, j], member) for j, t in enumerate(self.loss_timesteps)},
                           "roc": mia_stats.roc_points(by_t[fitted["chosen"][0]], member)}
        if "pia" in self.attacks:
            candidates["pia"] = pia_scores(model, x, y, t=self.pia_t, **kw).double().numpy()
            out["pia"] = {**mia_stats.single(candidates["pia"], n, **stats), "t": self.pia_t}
        if "secmi" in self.attacks:
            candidates["secmi"] = secmi_scores(model, x, y, t_sec=self.secmi_t, k=self.secmi_k, **kw).double().numpy()
            out["secmi"] = {**mia_stats.single(candidates["secmi"], n, **stats), "t_sec": self.secmi_t, "k": self.secmi_k}
        for attack in MIA_ATTACKS:
            if attack in out:
                out[attack]["verdict"] = _verdict(out[attack]["auc_interval"])
        best = mia_stats.crossfit(candidates, n, **stats)
        chosen = sorted({c.split("@")[0] for c in best["chosen"]})
        out["best"] = {**best, "attack": "/".join(chosen), "verdict": _verdict(best["auc_interval"])}
        return MembershipReport(out)

    @classmethod
    def figures(cls, runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Any]]:
        """ROC curves (log-scaled FPR, where low-FPR leakage shows) of each attack, one panel per setting."""
        drawn = setting_panels(runs, cls.name, 3.3)
        if drawn is None:
            return []
        fig, panels = drawn
        for ax, name, mia in panels:
            n = mia["num_nonmembers"]
            for attack in MIA_ATTACKS:
                if attack in mia and "roc" in mia[attack]:
                    roc = mia[attack]["roc"]
                    ax.plot(np.maximum(roc["fpr"], 1 / n), roc["tpr"], label=f"{attack} {mia[attack]['auc']:.2f}")
            ax.plot([1 / n, 1], [1 / n, 1], ls=":", color="grey")
            ax.set_xscale("log")
            ax.set_xlim(1 / n, 1)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel(f"FPR (log; n={n} held-out)")
            ax.set_ylabel("TPR")
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
        return [("membership inference ROC", fig)]
