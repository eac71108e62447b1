"""What can go wrong with an object: unreachable (retry later), missing, or corrupt."""
from __future__ import annotations

from conveyor.errors import ConveyorError


class TransientStorageError(ConveyorError):
    """The storage could not be reached or was overloaded; trying again later may work."""


class MissingObject(ConveyorError):
    """A key that should exist does not."""


class CorruptObject(ConveyorError):
    """An object's bytes do not hash to what was recorded."""
