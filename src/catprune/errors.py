"""The one exception type that tools report as a single line (no traceback)."""


class UserError(Exception):
    """An error the user can fix (a bad argument, a model that cannot be loaded)."""


class CacheMemoryError(UserError, MemoryError):
    """CAT pruning's caches do not fit in the device's memory: raised at the fill step that allocates them,
    naming the size they need, instead of an out-of-memory error deep inside a block."""
