"""Test instrumentation: run ``privdiff`` while logging, per DP-SGD step, the batch rows and a checksum of the noise.

usage: ``python tests/train/dp_step_log.py LOG.jsonl fit -c ...``

Each optimizer step appends one JSON line ``{"pid", "step", "rows", "noise"}`` and flushes it, so a
SIGKILL loses nothing already written. ``noise`` is a SHA-256 of every Gaussian draw the DP optimizer
added in that step (privdiff's ``LayoutFreeClipping.add_noise_to_all``, which draws with Opacus's
``_generate_noise``). Not a test file: the resume tests start it as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import privdiff.defenses.per_sample_grads as per_sample_grads
from privdiff.cli import main
from privdiff.train.module import DiffusionModule

_state: dict = {"rows": None, "step": None, "digest": hashlib.sha256()}
_real_noise = per_sample_grads._generate_noise
_real_add_noise = per_sample_grads.LayoutFreeClipping.add_noise_to_all
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
    per_sample_grads._generate_noise = _generate_noise
    per_sample_grads.LayoutFreeClipping.add_noise_to_all = _add_noise
    DiffusionModule.training_step = _training_step
    main(sys.argv[2:])
