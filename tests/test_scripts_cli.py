"""The scripts parse their options the way the docs call them (jsonargparse, through scripts/_cli.py)."""

from __future__ import annotations

import pytest


def _parser(load_script, name: str):
    return load_script("_cli").parser_for(load_script(name).main)


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
def test_documented_invocations_parse_to_the_expected_values(load_script, name, argv, expected):
    parsed = _parser(load_script, name).parse_args(argv).as_dict()
    for key, value in expected.items():
        assert parsed[key] == value, (name, argv, key, parsed[key])


def test_a_bad_option_is_refused_with_its_name(load_script):
    parser = _parser(load_script, "bench_dp")
    with pytest.raises(SystemExit):
        parser.parse_args(["--repeats", "many"])
    with pytest.raises(SystemExit):
        _parser(load_script, "t2i_prompted_copies").parse_args([])  # --run is required
