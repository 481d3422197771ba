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
from typing import Sequence

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc, binary_roc
from tqdm.auto import tqdm

from privdiff.model import DiffusionModel

__all__ = ["DEFAULT_TIMESTEPS", "LossAttackResult", "MIAResult", "attack_noise", "audit", "best_over_timesteps", "loss_scores",
           "loss_threshold_attack", "pia_scores", "secmi_scores"]

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
