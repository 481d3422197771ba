"""Test instrumentation: run ``privdiff`` while logging, per DP-SGD step, the batch rows and a checksum of the noise.

usage: ``python tests/train/dp_step_log.py LOG.jsonl fit -c ...``

Each optimizer step appends one JSON line ``{"pid", "step", "rows", "noise"}`` and flushes it, so a
SIGKILL loses nothing already written. ``noise`` is a SHA-256 of every Gaussian draw Opacus's
optimizer added in that step. Not a test file: the resume tests start it as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import opacus.optimizers.optimizer as opacus_optimizer

from privdiff.cli import main
from privdiff.train.module import DiffusionModule

_state: dict = {"rows": None, "step": None, "digest": hashlib.sha256()}
_real_noise = opacus_optimizer._generate_noise
_real_add_noise = opacus_optimizer.DPOptimizer.add_noise
_real_training_step = DiffusionModule.training_step


def _generate_noise(std, reference, generator=None, secure_mode=False):
    noise = _real_noise(std, reference, generator, secure_mode)
    _state["digest"].update(noise.detach().cpu().contiguous().numpy().tobytes())
    return noise


def _add_noise(self) -> None:
    _state["digest"] = hashlib.sha256()
    _real_add_noise(self)
    line = {"pid": os.getpid(), "step": _state["step"], "rows": _state["rows"], "noise": _state["digest"].hexdigest()}
    with open(LOG, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _training_step(self, batch, batch_idx):
    _state["rows"] = sorted(batch[2].tolist())
    _state["step"] = int(self.trainer.global_step)
    return _real_training_step(self, batch, batch_idx)


if __name__ == "__main__":
    LOG = sys.argv[1]
    opacus_optimizer._generate_noise = _generate_noise
    opacus_optimizer.DPOptimizer.add_noise = _add_noise
    DiffusionModule.training_step = _training_step
    main(sys.argv[2:])
