"""The scripts' command lines: a typed, documented ``main`` parsed by jsonargparse, spelled as the docs call it.

``privdiff audit`` and ``privdiff compare`` turn a function's signature into options with jsonargparse's
``auto_cli``; the scripts do the same, with two differences ``auto_cli`` does not offer: a ``bool`` parameter
is a flag (``--quick``, not ``--quick true``) and a list or tuple takes space-separated values
(``--modes hooks hooks+canaries``). Options are spelled with hyphens (``--cpu-smoke``) or with the
parameter's underscores (``--cpu_smoke``); their types and defaults come from the signature, their help from
the docstring's ``Args:`` section, and ``--config FILE`` reads them from YAML as the ``privdiff`` command does.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from typing import Any, Callable, Sequence

import docstring_parser
from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help (types and defaults) under the script's docstring as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:  # as RawDescriptionHelpFormatter's
        return "".join(indent + line for line in text.splitlines(keepends=True))


def _sequence(hint: Any) -> tuple[Any, Any, int | str] | None:
    """(origin, item type, nargs) of a ``Sequence[X]``, ``list[X]``, ``tuple[X, ...]`` or ``tuple[X, X]`` hint
    (``None`` allowed), else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        hint = options[0] if len(options) == 1 else hint
    origin, items = typing.get_origin(hint), typing.get_args(hint)
    if origin not in (list, tuple, collections.abc.Sequence):
        return None
    if origin is tuple and items[-1] is not Ellipsis:
        if len(set(items)) != 1:
            raise TypeError(f"a tuple option takes items of one type, got {hint}")
        return origin, items[0], len(items)
    return origin, items[0], "+"


def _option(name: str, hint: Any, default: Any) -> dict[str, Any]:
    """``add_argument``'s keywords for one parameter of ``main``."""
    kwargs: dict[str, Any] = {"required": True} if default is inspect.Parameter.empty else {"default": default}
    if hint is bool:
        if default is not False:
            raise TypeError(f"--{name}: a bool option is a flag and must default to False, got {default!r}")
        return {**kwargs, "action": "store_true"}
    sequence = _sequence(hint)
    if sequence is not None:
        if isinstance(kwargs.get("default"), tuple):
            kwargs["default"] = list(kwargs["default"])  # jsonargparse checks a nargs option's default in place
        return {**kwargs, "type": sequence[1], "nargs": sequence[2]}
    return {**kwargs, "type": hint}


def parser_for(function: Callable[..., Any], description: str | None = None) -> ArgumentParser:
    """A jsonargparse parser with one option per parameter of ``function`` (keyword parameters with type hints)."""
    parser = ArgumentParser(description=description, formatter_class=_HelpFormatter, default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (keys with underscores)")
    docs = {p.arg_name: p.description for p in docstring_parser.parse(function.__doc__ or "").params}
    hints = typing.get_type_hints(function)
    for name, parameter in inspect.signature(function).parameters.items():
        flags = dict.fromkeys([f"--{name.replace('_', '-')}", f"--{name}"])  # the hyphenated spelling first, in --help
        parser.add_argument(*flags, dest=name, help=docs.get(name), **_option(name, hints[name], parameter.default))
    return parser


def run_main(function: Callable[..., Any], description: str | None = None, argv: Sequence[str] | None = None) -> Any:
    """Parse ``argv`` (default: the command line) for ``function``'s parameters, call it and return what it returns."""
    config = parser_for(function, description).parse_args(argv).as_dict()
    config.pop("config", None)
    hints = typing.get_type_hints(function)
    for name, value in config.items():  # nargs gives lists: a tuple parameter gets a tuple
        if isinstance(value, list) and _sequence(hints[name])[0] is tuple:
            config[name] = tuple(value)
    return function(**config)
