"""Plain option models: the part of pydantic's model API the run path uses, without pydantic.

Every option is declared once, as a pydantic field in ``options.py``.  Importing pydantic and
building those models costs ~60 ms of CPU and ~12 MiB at every start-up, so the run path uses
``settings_table.py`` instead: plain classes that ``tools/gen_settings.py`` writes from the
models (a test fails when it is stale).  This module is what those classes stand on:

* ``Field``: what pydantic's ``FieldInfo`` says of a field (``alias``, ``default``,
  ``default_factory``, ``description``, ``json_schema_extra``, ``get_default``) and how a value
  of it is validated: the same ``BeforeValidator`` functions of ``values.py`` in the order
  pydantic runs them, then its ``ge``/``le`` constraints.
* ``PlainModel``: ``model_validate`` (what ``conf.py`` feeds it: strings, lists of strings for
  repeatable options, ``name``/``locations``; unknown names refused as ``extra="forbid"`` does),
  ``model_fields``, ``model_fields_set``, ``model_copy(update=)``, equality, hashing and
  immutability as pydantic's frozen models have them.  The constructor takes values as they
  are (like pydantic's ``model_construct``).
* ``ValidationError``: ``errors()`` gives the ``loc`` and ``msg`` pydantic gives for the same
  input, word for word, which is all the reader turns into messages.
* ``field_extra``: the meta of an option (scope, repeat, why unsupported ...), used by both.

Imports nothing of tunnel.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, NoReturn, TypeVar

Validator = Callable[[object], object]
Scope = Literal["global", "service"]
Loc = tuple[str | int, ...]
M = TypeVar("M", bound="PlainModel")


def field_extra(
    scope: Scope = "service",
    repeat: bool = False,
    unsupported: str | None = None,
    accepted: tuple[str, ...] = (),
    python: tuple[int, int] | None = None,
    extension: bool = False,
) -> dict[str, Any]:
    """An option's meta (pydantic's ``json_schema_extra``): see ``options.opt``.  An option
    that needs a newer Python is unsupported on an older one, saying so."""
    extra: dict[str, Any] = {"scope": scope, "repeat": repeat}
    if extension:
        extra["extension"] = True
    if python is not None:
        extra["python"] = ".".join(map(str, python))
        unsupported = (
            f"it needs Python {extra['python']} or newer ({unsupported}); this is Python {sys.version.split()[0]}"
            if sys.version_info < python
            else None
        )
    if unsupported:
        extra["unsupported"] = unsupported
        extra["accepted"] = list(accepted)
    return extra


class ValidationError(ValueError):
    """Values a model refused: ``errors()`` as pydantic's (``type``, ``loc``, ``msg``)."""

    def __init__(self, title: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} validation error(s) for {title}")
        self.title = title
        self._errors = errors

    def errors(self) -> list[dict[str, Any]]:
        return list(self._errors)


class Field:
    """One field: pydantic's ``FieldInfo`` attributes the code reads, and its validation."""

    __slots__ = (
        "alias",
        "default",
        "default_factory",
        "description",
        "json_schema_extra",
        "repr",
        "validators",
        "ge",
        "le",
        "each",
    )

    def __init__(
        self,
        alias: str | None,
        default: Any = None,
        *,
        factory: Callable[[], Any] | None = None,
        description: str | None = None,
        extra: dict[str, Any] | None = None,
        validators: tuple[Validator, ...] = (),
        ge: int | None = None,
        le: int | None = None,
        each: bool = False,
        repr: bool = True,  # noqa: A002 - pydantic's word
    ) -> None:
        self.alias = alias
        self.default = default
        self.default_factory = factory
        self.description = description
        self.json_schema_extra = extra
        self.repr = repr
        self.validators = validators  # in the order they run
        self.ge = ge
        self.le = le
        self.each = each  # a list: the validators and constraints apply to each item

    def get_default(self, *, call_default_factory: bool = False) -> Any:
        if self.default_factory is not None:
            return self.default_factory() if call_default_factory else None
        return self.default

    def check(self, value: object, loc: Loc, errors: list[dict[str, Any]]) -> object:
        """One value through the validators and constraints; a failure is appended to
        ``errors`` in pydantic's words (and the value returned is then meaningless)."""
        for validator in self.validators:
            try:
                value = validator(value)
            except ValueError as exc:
                errors.append({"type": "value_error", "loc": loc, "msg": f"Value error, {exc}"})
                return None
            except AssertionError as exc:
                errors.append({"type": "assertion_error", "loc": loc, "msg": f"Assertion failed, {exc}"})
                return None
        if self.ge is not None and value < self.ge:  # type: ignore[operator]
            msg = f"Input should be greater than or equal to {self.ge}"
            errors.append({"type": "greater_than_equal", "loc": loc, "msg": msg})
        elif self.le is not None and value > self.le:  # type: ignore[operator]
            msg = f"Input should be less than or equal to {self.le}"
            errors.append({"type": "less_than_equal", "loc": loc, "msg": msg})
        return value


def _frozen(self: object, name: str, value: object = None) -> NoReturn:
    raise AttributeError(f"{type(self).__name__} is frozen: use model_copy(update=...)")


class PlainModel:
    """The base of the generated settings classes (their fields are ``__slots__``)."""

    __slots__ = ("_fields_set",)
    model_fields: ClassVar[dict[str, Field]] = {}
    _fields_set: set[str]

    def __init__(self, **values: Any) -> None:
        fields = type(self).model_fields
        unknown = values.keys() - fields.keys()
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        setter = object.__setattr__
        for name, info in fields.items():
            if name in values:
                setter(self, name, values[name])
            elif info.default_factory is not None:
                setter(self, name, info.default_factory())
            else:
                setter(self, name, info.default)
        setter(self, "_fields_set", set(values))

    @classmethod
    def model_validate(cls: type[M], data: Mapping[str, Any]) -> M:
        """Validate what the reader feeds in, as the pydantic model does (``extra="forbid"``)."""
        errors: list[dict[str, Any]] = []
        out: dict[str, Any] = {}
        fields = cls.model_fields
        for name, info in fields.items():
            if name not in data:
                continue
            raw = data[name]
            if not info.each:
                out[name] = info.check(raw, (name,), errors)
            elif isinstance(raw, (list, tuple)):
                out[name] = [info.check(item, (name, i), errors) for i, item in enumerate(raw)]
            else:
                errors.append({"type": "list_type", "loc": (name,), "msg": "Input should be a valid list"})
        for name in data:
            if name not in fields:
                errors.append(
                    {"type": "extra_forbidden", "loc": (name,), "msg": "Extra inputs are not permitted"}
                )
        if errors:
            raise ValidationError(cls.__name__, errors)
        return cls(**out)

    @property
    def model_fields_set(self) -> set[str]:
        return self._fields_set

    def model_copy(self: M, *, update: Mapping[str, Any] | None = None) -> M:
        new = object.__new__(type(self))
        setter = object.__setattr__
        for name in type(self).model_fields:
            setter(new, name, getattr(self, name))
        for name, value in (update or {}).items():
            setter(new, name, value)
        setter(new, "_fields_set", self._fields_set | set(update or ()))
        return new

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in type(self).model_fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(type(self)) + hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n, f in type(self).model_fields.items() if f.repr)
        return f"{type(self).__name__}({shown})"

    def __reduce__(self) -> tuple[Any, ...]:
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return (_rebuild, (type(self), values, self._fields_set))

    __setattr__ = _frozen
    __delattr__ = _frozen


def _rebuild(cls: type[M], values: dict[str, Any], fields_set: set[str]) -> M:
    new = cls(**values)
    object.__setattr__(new, "_fields_set", set(fields_set))
    return new
