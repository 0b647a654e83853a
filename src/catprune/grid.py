"""What fixes a frontier run and its grid of pruned settings, read from the command line: the values of
any :class:`~catprune.config.CATPruningConfig` field by the field's type. No torch here: ``catprune
frontier --help`` lists the fields and their types at once; :mod:`catprune.frontier` runs the grid."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import CATPruningConfig
from .names import SOLVER_NAMES


@dataclass(frozen=True)
class FrontierSettings:
    """What fixes every image of a frontier run (recorded in ``run.json``; a rerun must use the same). The
    step counts and the grid are not among them: settings can be added to a finished run."""

    model: str
    prompts: str
    reference_steps: int = 28
    """Steps of ``full``, the unpruned model whose images are the reference of fidelity."""
    seed: int = 0
    guidance_scale: float | None = None
    """None: the pipeline's default."""
    dtype: str = "auto"
    reference_solver: str | None = None
    """The reference's solver (:data:`catprune.names.SOLVER_NAMES`); None: the pipeline's own."""

    def __post_init__(self) -> None:
        if self.reference_steps < 1:
            raise ValueError(f"reference steps must be >= 1, got {self.reference_steps}")
        if self.reference_solver is not None and self.reference_solver not in SOLVER_NAMES:
            raise ValueError(
                f"unknown reference solver {self.reference_solver!r}; known: {', '.join(SOLVER_NAMES)}"
            )


# --- the grid ------------------------------------------------------------------------------------------


def config_fields() -> dict[str, Any]:
    """CATPruningConfig's fields and their types, in declaration order (the module postpones annotations,
    so the types are resolved here)."""
    hints = typing.get_type_hints(CATPruningConfig)
    return {field.name: hints[field.name] for field in dataclasses.fields(CATPruningConfig)}


_TOP_LEVEL_COMMA = re.compile(r",(?![^\[\(]*[\]\)])")
"""A comma outside brackets: it separates values, one inside a tuple's brackets separates its elements."""


def parse_value(text: str, kind: Any) -> Any:
    """A value of type ``kind`` from its command-line text: ``true``/``false`` for bool, int, float, str, one
    of a Literal's options, ``none`` for ``X | None``, and for tuples ``[a,b]`` (or ``(a,b)``; ``[]``: the
    empty tuple; a bare element: a tuple of one). ValueError if the text is not one."""
    text = text.strip()
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in arguments:
            return None
        for option in (argument for argument in arguments if argument is not type(None)):
            try:
                return parse_value(text, option)
            except ValueError:
                continue
        raise ValueError(f"{text!r} is not of type {type_name(kind)}")
    if origin is typing.Literal:
        for option in arguments:
            if str(option) == text:
                return option
        raise ValueError(f"{text!r} is not one of {', '.join(map(str, arguments))}")
    if origin is tuple:
        inner = text[1:-1] if text[:1] in ("[", "(") and text[-1:] in ("]", ")") else text
        elements = [element for element in inner.split(",") if element.strip()]
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(parse_value(element, arguments[0]) for element in elements)
        if len(elements) != len(arguments):
            raise ValueError(f"{text!r} is not a tuple of {len(arguments)}")
        return tuple(
            parse_value(element, argument) for element, argument in zip(elements, arguments, strict=True)
        )
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{text!r} is not true or false")
        return text.lower() == "true"
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{text!r} is not of type {type_name(kind)}") from None
    raise ValueError(f"values of type {type_name(kind)} cannot be given on the command line")


def type_name(kind: Any) -> str:
    """``int``, ``tuple[int, ...]``, ``Literal['none', 'cfg']``: a field's type as help and errors say it."""
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``FIELD=VALUE[,VALUE...]`` specifications as {field: values}, in CATPruningConfig's field order (so a
    setting's name does not depend on the order of the options), each value read by the field's type
    (:func:`parse_value`). An unknown or repeated field, or a value of the wrong type, is a ValueError that
    names it."""
    fields = config_fields()
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        name, equals, values = (part.strip() for part in spec.partition("="))
        if not equals or not values:
            raise ValueError(f"--grid {spec!r}: expected FIELD=VALUE[,VALUE...]")
        if name == "steps":
            raise ValueError("--grid steps: the step counts of the pruned settings are --steps")
        if name not in fields:
            raise ValueError(
                f"--grid {spec!r}: CATPruningConfig has no field {name!r}; its fields: {', '.join(fields)}"
            )
        if name in grid:
            raise ValueError(f"--grid {name} is given twice; give all its values in one option")
        try:
            parsed = [parse_value(value, fields[name]) for value in _TOP_LEVEL_COMMA.split(values)]
        except ValueError as error:
            raise ValueError(f"--grid {spec!r}: {error} ({name}: {type_name(fields[name])})") from None
        grid[name] = list(dict.fromkeys(parsed))
    return {name: grid[name] for name in fields if name in grid}


def value_text(value: Any) -> str:
    """A grid value as :func:`parse_value` reads it back (how names and tables write it)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ",".join(map(value_text, value)) + "]"
    return "none" if value is None else str(value)
