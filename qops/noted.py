"""``Noted``: a dict that notes whether it was changed through it."""

from __future__ import annotations

from typing import Any, cast


class Noted(dict[str, Any]):
    """A dict that notes whether it was changed through it since it was made (``changed``):
    the headers and properties of the messages ``TaskMessages.build`` makes, whose
    envelope then comes from a template unless something changed them
    (qops/envelopes.py). Making one (``Noted(mapping, **more)``) is not a change; a
    value changed in place (a list in it) is not seen."""

    changed = False

    def __setitem__(self, key: Any, value: Any) -> None:
        self.changed = True
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.changed = True
        super().__delitem__(key)

    def __ior__(self, other: Any) -> Noted:  # type: ignore[misc,override]
        self.changed = True
        return cast("Noted", super().__ior__(other))

    def pop(self, *args: Any) -> Any:
        self.changed = True
        return super().pop(*args)

    def popitem(self) -> Any:
        self.changed = True
        return super().popitem()

    def clear(self) -> None:
        self.changed = True
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.changed = True
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.changed = True
        return super().setdefault(key, default)
