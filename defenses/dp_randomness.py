"""Where DP-SGD's randomness comes from: fresh operating-system entropy, never the run's seed.

DP-SGD's guarantee rests on two random draws that an adversary must neither know nor see twice:
which rows join each Poisson batch, and the Gaussian noise added to each update. Lightning seeds
the global torch generator from the run's (public) seed and applies it again on a resume without
restoring its state, so anything drawn from that generator repeats: a resumed run replayed the
batches *and* the noise of its first steps (two updates with the same noise reveal their difference
without noise), and two runs of one config trained bit-identical "private" weights (design.md,
"DP randomness on resume"). Both draws therefore use generators of their own, seeded at every process start with
63 bits from :mod:`secrets` (``os.urandom``). Under DDP rank 0 draws the sampling seed and
broadcasts it over the process group, since every process must draw the same Poisson mask; the
noise is added on rank 0 only. A seed lives in memory only: never in a checkpoint, a log or a file.

torch's generators are not cryptographically secure (the CPU one is a Mersenne Twister, CUDA's is
Philox); an adversary who sees the trained weights does not observe their outputs. With
``secure_mode`` Opacus's noise that resists floating-point attacks is drawn (Holohan & Braghin 2021,
as in Opacus: 4 draws summed), and where ``torchcsprng`` is installed its ``/dev/urandom``
generator replaces torch's (Opacus's ``secure_mode``; torchcsprng has no wheels for torch 2.x today).

For debugging only, ``debug_seed`` makes both draws a function of a number: then anyone who knows
it can regenerate the noise, epsilon does not hold, and :attr:`DPRandomness.holds` says so for
the report. Even then a resumed run draws new batches (the seed is mixed with the steps done).
"""

from __future__ import annotations

import secrets
import warnings
import zlib

import numpy as np
import torch

__all__ = ["DPRandomness", "fresh_seed"]


def fresh_seed() -> int:
    """Return 63 random bits from the operating system's entropy pool (never derived from a run's seed)."""
    return secrets.randbits(63)


def _csprng():
    try:
        import torchcsprng  # noqa: F401 - optional: Opacus's secure_mode generator
    except ImportError:
        return None
    return torchcsprng


class DPRandomness:
    """Makes the generators of DP-SGD's Poisson sampling and noise.

    Args:
        secure_mode: draw noise that resists floating-point attacks (Opacus's ``secure_mode``
            noise), from torchcsprng's ``/dev/urandom`` generator when that package is installed.
        debug_seed: for debugging only: derive every draw from this number (epsilon then does not
            hold; the report says so).
    """

    def __init__(self, secure_mode: bool = False, debug_seed: int | None = None) -> None:
        if debug_seed is not None and (isinstance(debug_seed, bool) or not isinstance(debug_seed, int) or debug_seed < 0):
            raise ValueError(f"dp_sgd debug_noise_seed must be a non-negative integer or null, got {debug_seed!r}")
        self.secure_mode = bool(secure_mode)
        self.debug_seed = debug_seed
        self._csprng = _csprng() if secure_mode and debug_seed is None else None
        if secure_mode and debug_seed is None and self._csprng is None:
            warnings.warn(
                "dp_sgd secure_mode: torchcsprng is not installed, so the noise is drawn (in Opacus's "
                "floating-point-safe way) from torch's generators seeded with OS entropy rather than from "
                "/dev/urandom directly",
                stacklevel=2,
            )

    @property
    def holds(self) -> bool:
        """False when the draws are a function of a known number (``debug_seed``): epsilon does not hold."""
        return self.debug_seed is None

    def describe(self) -> str:
        """Where the draws come from, for the report."""
        if not self.holds:
            return f"DEBUG: fixed seed {self.debug_seed}; the noise can be regenerated, epsilon does not hold"
        if self._csprng is not None:
            return "torchcsprng /dev/urandom generator, floating-point-safe noise (Opacus secure_mode)"
        source = "torch generators seeded with 63 bits of OS entropy at every process start"
        return source + (", floating-point-safe noise (Opacus secure_mode)" if self.secure_mode else "")

    def seed(self, purpose: str, steps_done: int = 0) -> int:
        """A fresh seed (or, in debug mode, one derived from ``debug_seed``, ``purpose`` and ``steps_done``)."""
        if self.debug_seed is None:
            return fresh_seed()
        mixed = np.random.SeedSequence([self.debug_seed, int(steps_done), zlib.crc32(purpose.encode())])
        return int(mixed.generate_state(1, np.uint64)[0]) & (2**63 - 1)

    def generator(self, purpose: str, device: torch.device | str = "cpu", steps_done: int = 0) -> torch.Generator:
        """A generator for ``purpose`` on ``device``, seeded by :meth:`seed`."""
        device = torch.device(device)
        if self._csprng is not None and device.type == "cpu":
            return self._csprng.create_random_device_generator("/dev/urandom")
        return torch.Generator(device=device).manual_seed(self.seed(purpose, steps_done))

    def shared_generator(self, purpose: str, rank: int, steps_done: int = 0) -> torch.Generator:
        """A CPU generator seeded alike on every process of the ``torch.distributed`` group.

        Rank 0 draws the seed and broadcasts it; no process writes it anywhere. Every process
        must call this at the same point (it is a collective operation).
        """
        seed = [self.seed(purpose, steps_done) if rank == 0 else None]
        torch.distributed.broadcast_object_list(seed, src=0)
        return torch.Generator().manual_seed(int(seed[0]))
