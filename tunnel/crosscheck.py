"""``pytunnel check``'s second opinion: the configuration validated by the pydantic models too.

The run path validates with the plain classes generated from the models (``settings.py``);
``pytunnel check`` also builds the configuration with the models themselves (``options.py``)
and compares what comes out -- every problem's words, or every option's value.  They agree by
construction (tests/test_plainsettings.py); a difference is a pytunnel bug, reported as such.

Only ``pytunnel check`` imports this module (pydantic is not on the run path).
Imports conf, options, errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunnel import conf, options
from tunnel.errors import ConfigError


def _shape(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_shape(v) for v in value])
    if isinstance(value, dict):
        return ("dict", {k: _shape(v) for k, v in value.items()})
    return (type(value).__name__, value)


def _model(where: str, model: Any) -> list[tuple[str, object]]:
    fields = type(model).model_fields
    return [(f"{where} {name}", _shape(getattr(model, name))) for name in fields] + [
        (f"{where} options set", sorted(model.model_fields_set))
    ]


def _outcome(raw: conf.RawConfig, models: tuple[conf.Validate, conf.Validate]) -> list[tuple[str, object]]:
    try:
        s = conf.build(raw, models)
    except ConfigError as exc:
        return [("problem", p.render()) for p in exc.problems]
    out = _model("global", s.globals) + _model("defaults", s.defaults)
    for svc in s.services:
        out += _model(f"[{svc.name}]", svc)
    return out


def disagreement(read: Callable[[], conf.RawConfig]) -> str | None:
    """None when both kinds of model say the same of the configuration ``read`` gives;
    else the first difference."""
    try:
        plain, models = _outcome(read(), conf.PLAIN), _outcome(read(), options.validators())
    except ConfigError:
        return None  # nothing to read: the check itself says so
    for a, b in zip(plain, models, strict=False):
        if a != b:
            return f"plain settings: {a[0]} = {a[1]!r}; pydantic models: {b[0]} = {b[1]!r}"
    if len(plain) != len(models):
        return f"plain settings: {len(plain)} items; pydantic models: {len(models)}"
    return None
