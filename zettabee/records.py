"""Records: classes of named fields, declared as dataclasses are, for the check plugins' path.

A record class lists its fields as annotations with their defaults, in the order its
constructor takes them, and gets ``__init__``, ``__eq__``, ``__repr__`` (and, frozen,
``__hash__`` and no assignment) as a dataclass does::

    class Endpoint(Record, frozen=True):
        host: str
        fs: str

Why not ``dataclasses``: a check plugin loads every class of ``pair``, ``config``,
``state``, ``health`` and what they import, and Nagios starts one thousands of times a
day. ``@dataclass`` compiles each class's methods when its module is imported, and the
module itself pulls in ``inspect``: on those 15 classes that was 110 M instructions of a
check's 348 M, more than the bare interpreter's whole start (88 M). A record's methods are
written once, here. The engine's own classes stay dataclasses.

mypy reads a record class as a dataclass (``dataclass_transform``), constructor included.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing for the annotations only: importing it costs every check
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar, TypeVar, dataclass_transform

    R = TypeVar("R", bound="Record")
else:

    def dataclass_transform(**_: object) -> Callable[[type], type]:
        return lambda cls: cls


class FrozenRecordError(AttributeError):
    """An assignment to a field of a frozen record (dataclasses' FrozenInstanceError)."""


class Field:
    """A field's default made anew for every record (``default_factory``), or a field
    left out of the hash (a dict in a frozen record)."""

    __slots__ = ("default_factory", "hash")

    def __init__(self, default_factory: Callable[[], Any] | None, hash: bool) -> None:
        self.default_factory = default_factory
        self.hash = hash


def field(*, default_factory: Callable[[], Any] | None = None, hash: bool = True) -> Any:
    """As ``dataclasses.field``: ``default_factory`` for a mutable default, ``hash=False``
    for a field a frozen record's hash leaves out."""
    return Field(default_factory, hash)


_MISSING = object()


def _refuse_assignment(self: Record, name: str, value: object) -> None:
    raise FrozenRecordError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")


def _refuse_deletion(self: Record, name: str) -> None:
    raise FrozenRecordError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")


@dataclass_transform(field_specifiers=(field,))
class Record:
    """The base of every record class (see the module's docstring)."""

    _names: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, Any]] = {}
    _factories: ClassVar[dict[str, Callable[[], Any]]] = {}
    _hashed: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, frozen: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inherited = next((base for base in cls.__mro__[1:] if base.__dict__.get("_names")), None)
        if inherited is not None:  # its fields would be lost: only cls's own are read
            raise TypeError(f"{cls.__name__}: a record cannot extend {inherited.__name__}")
        cls._names = tuple(cls.__dict__.get("__annotations__", {}))
        cls._defaults, cls._factories, unhashed = {}, {}, set()
        for name in cls._names:
            default = cls.__dict__.get(name, _MISSING)
            if isinstance(default, Field):
                if default.default_factory is not None:
                    cls._factories[name] = default.default_factory
                if not default.hash:
                    unhashed.add(name)
                delattr(cls, name)  # as in a dataclass: no class attribute for a factory
            elif default is not _MISSING:
                cls._defaults[name] = default
            elif cls._defaults or cls._factories:
                raise TypeError(f"{cls.__name__}.{name}: no default after fields with one")
        cls._hashed = tuple(name for name in cls._names if name not in unhashed)
        if frozen:
            cls.__setattr__ = _refuse_assignment  # type: ignore[assignment]
            cls.__delattr__ = _refuse_deletion  # type: ignore[assignment]
            cls.__hash__ = Record._hash  # type: ignore[assignment]
        else:
            cls.__hash__ = None  # type: ignore[assignment]  # equal by value, and mutable

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        names = cls._names
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__}() takes {len(names)} arguments, {len(args)} given")
        values = dict(zip(names, args, strict=False))  # fewer args than fields: the rest below
        for name in names[len(args) :]:
            if name in kwargs:
                values[name] = kwargs.pop(name)
            elif name in cls._defaults:
                values[name] = cls._defaults[name]
            elif name in cls._factories:
                values[name] = cls._factories[name]()
            else:
                raise TypeError(f"{cls.__name__}() missing argument {name!r}")
        if kwargs:
            extra = next(iter(kwargs))
            taken = "got two values for" if extra in values else "got an unexpected argument"
            raise TypeError(f"{cls.__name__}() {taken} {extra!r}")
        self.__dict__.update(values)  # past a frozen record's __setattr__, as dataclasses do

    def _values(self) -> tuple[Any, ...]:
        return tuple(self.__dict__[name] for name in self._names)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def _hash(self) -> int:
        return hash(tuple(self.__dict__[name] for name in self._hashed))

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={self.__dict__[name]!r}" for name in self._names)
        return f"{type(self).__qualname__}({inner})"


def fields(record: Record | type[Record]) -> tuple[str, ...]:
    """The names of a record's fields, in order (``dataclasses.fields`` gives Field
    objects; every caller here wants the names)."""
    return record._names


def replace(record: R, **changes: Any) -> R:
    """A copy of ``record`` with ``changes`` (``dataclasses.replace``)."""
    values = {name: record.__dict__[name] for name in record._names}
    unknown = set(changes) - set(values)
    if unknown:
        raise TypeError(f"{type(record).__name__} has no field {sorted(unknown)[0]!r}")
    values.update(changes)
    return type(record)(**values)


def asdict(record: Record) -> dict[str, Any]:
    """The fields of ``record`` by name. Unlike ``dataclasses.asdict`` it neither copies
    the values nor turns records inside it into dicts: a status file's fields are plain."""
    return {name: record.__dict__[name] for name in record._names}
