"""Small name → implementation registries; a miss lists the known names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from edgepack.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Implementations registered under the names target profiles use."""

    def __init__(self, what: str, hint: str | None = None) -> None:
        self.what = what
        self.hint = hint
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.what, name, list(self._items), hint=self.hint) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
