"""No audit plugin imports or constructs another: what several plugins use is an audit signal (eval/signals.py).

A plugin module is a module of ``privdiff.eval`` that defines an ``AuditPlugin`` subclass. It may import the shared
pieces (plugin contract, signals, controls, thresholds, the pure attack functions) but no other plugin module, name no
other plugin class and give no other plugin's ``class_path``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import privdiff.eval as eval_package
from privdiff.eval.plugin import AuditPlugin


def plugin_modules() -> dict[str, set[str]]:
    """``{module name: names of the AuditPlugin classes it defines}`` over privdiff.eval."""
    found: dict[str, set[str]] = {}
    for info in pkgutil.iter_modules(eval_package.__path__):
        name = f"{eval_package.__name__}.{info.name}"
        module = importlib.import_module(name)
        classes = {cls.__name__ for _, cls in inspect.getmembers(module, inspect.isclass)
                   if issubclass(cls, AuditPlugin) and cls is not AuditPlugin and cls.__module__ == name}
        if classes:
            found[name] = classes
    return found


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.rsplit(".", node.level)[0]
    return f"{base}.{node.module}" if node.module else base


def violations(module: str, source: str, plugins: dict[str, set[str]]) -> list[str]:
    """What in ``source`` (the text of plugin module ``module``) imports, names or points at another plugin."""
    others = {m: names for m, names in plugins.items() if m != module}
    foreign = {name for names in others.values() for name in names}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            for alias in node.names:
                if target in others or f"{target}.{alias.name}" in others:
                    found.append(f"line {node.lineno}: imports {target}.{alias.name} (a plugin module)")
                elif alias.name in foreign:
                    found.append(f"line {node.lineno}: imports the plugin {alias.name}")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: imports {a.name} (a plugin module)" for a in node.names if a.name in others]
        elif isinstance(node, ast.Name) and node.id in foreign:
            found.append(f"line {node.lineno}: names the plugin {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in foreign:
            found.append(f"line {node.lineno}: names the plugin {node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [f"line {node.lineno}: class_path of the plugin {m}.{n}" for m, names in others.items() for n in names
                      if f"{m}.{n}" in node.value]
    return found


def test_the_built_in_plugins_are_found():
    plugins = plugin_modules()
    assert {"privdiff.eval.extraction", "privdiff.eval.prompt_extraction", "privdiff.eval.detection", "privdiff.eval.mia",
            "privdiff.eval.memorization", "privdiff.eval.quality", "privdiff.eval.one_run"} <= set(plugins)
    assert "ExtractionAttack" in plugins["privdiff.eval.extraction"]


def test_no_plugin_imports_or_constructs_another_plugin():
    plugins = plugin_modules()
    problems = {m: v for m in plugins if (v := violations(m, inspect.getsource(importlib.import_module(m)), plugins))}
    assert not problems, f"plugins that reach into other plugins (use an audit signal instead): {problems}"


def test_the_check_catches_each_way_one_plugin_can_use_another():
    plugins = plugin_modules()
    here = "privdiff.eval.prompt_extraction"
    bad = {
        "relative import": "from .extraction import generate_and_filter\n",
        "absolute import": "from privdiff.eval.detection import caption_scores\n",
        "module import": "import privdiff.eval.mia\n",
        "package import": "from privdiff.eval import extraction\n",
        "construction": "def run(context):\n    return make.ExtractionAttack(delta=0.1).thresholds(context)\n",
        "class_path": 'SPEC = {"class_path": "privdiff.eval.memorization.NNRatioMemorization"}\n',
    }
    for way, source in bad.items():
        assert violations(here, source, plugins), way
    fine = ("from .signals import copy_thresholds\nfrom .carlini import generate_and_filter\n"
            "from .caption_scores import caption_scores\nfrom .plugin import AuditPlugin\n")
    assert not violations(here, fine, plugins)


def test_declared_signals_are_computed_once_before_the_plugins_that_read_them():
    from privdiff.eval.signals import SIGNALS, signal_order

    for module, names in plugin_modules().items():
        for name in names:
            plugin = getattr(importlib.import_module(module), name)()  # every built-in plugin has defaults
            assert set(plugin.needs) <= set(SIGNALS), (name, plugin.needs)
    try:
        signal_order({"samples_decoded_twice"})
    except ValueError as error:
        assert "samples_decoded_twice" in str(error) and "copy_thresholds" in str(error)
    else:
        raise AssertionError("an unknown signal was accepted")
