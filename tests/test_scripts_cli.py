"""The scripts parse their options the way the docs call them (jsonargparse, through scripts/_cli.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _main(name: str):
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # a dataclass of the script looks its module up
        spec.loader.exec_module(module)
        from _cli import parser_for
    finally:
        sys.path.remove(str(SCRIPTS))
    return parser_for(module.main)


@pytest.mark.parametrize("name, argv, expected", [
    ("bench_dp", ["--modes", "hooks", "hooks+canaries", "--repeats", "9"], {"modes": ["hooks", "hooks+canaries"], "repeats": 9}),
    ("gpu_check", ["--cpu-smoke"], {"cpu_smoke": True}),
    ("gpu_check", [], {"cpu_smoke": False}),
    ("bench_audit", ["--gpu-tflops", "60"], {"gpu_tflops": 60.0}),
    ("bench_audit", ["--gpu_tflops=60"], {"gpu_tflops": 60.0}),
    ("bench_knn", ["--child-memory", "1", "2", "3", "4"], {"child_memory": [1, 2, 3, 4]}),
    ("audit_dp_step", ["--epsilons", "1", "2", "--bug-epsilons", "3"], {"epsilons": [1.0, 2.0], "bug_epsilons": [3.0]}),
    ("t2i_prompted_copies", ["--run", "runs/t2i/none", "--seeds", "8"], {"seeds": 8}),
])
def test_documented_invocations_parse_to_the_expected_values(name, argv, expected):
    parsed = _main(name).parse_args(argv).as_dict()
    for key, value in expected.items():
        assert parsed[key] == value, (name, argv, key, parsed[key])


def test_a_bad_option_is_refused_with_its_name():
    parser = _main("bench_dp")
    with pytest.raises(SystemExit):
        parser.parse_args(["--repeats", "many"])
    with pytest.raises(SystemExit):
        _main("t2i_prompted_copies").parse_args([])  # --run is required
