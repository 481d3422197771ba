"""Shared test settings: tiny models, few threads, offline loggers."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches (the FID feature classifiers) go to a folder of the test session, not the user's home."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture()
def load_script():
    """``load(name)``: ``scripts/<name>.py`` as a module named ``script_<name>``, with ``scripts/`` on the path while
    it loads (as when run from there) and registered in ``sys.modules`` (a dataclass of the script looks it up)."""

    def load(name: str):
        sys.path.insert(0, str(SCRIPTS))
        try:
            spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(SCRIPTS))
        return module

    return load


@pytest.fixture()
def fit_until_checkpoint_then_sigkill():
    """Run ``python -m privdiff fit ARGS --run_dir RUN`` in a subprocess, SIGKILL it shortly after it writes
    ``RUN/checkpoints/last.ckpt`` (the steps after that checkpoint must be lost, not counted); return its pid."""

    def run(args: list[str], run_dir: Path, log_path: Path, cwd: Path, timeout_s: float = 120, after_s: float = 0.2) -> int:
        last = run_dir / "checkpoints" / "last.ckpt"
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "privdiff", "fit", *args, "--run_dir", str(run_dir),
                                     "--trainer.max_steps", "100000"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + timeout_s
                while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(after_s)
                assert proc.poll() is None, log_path.read_text()[-3000:]
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert proc.returncode == -signal.SIGKILL
        return proc.pid

    return run
