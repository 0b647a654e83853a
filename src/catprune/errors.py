"""The one exception type that tools report as a single line (no traceback)."""


class UserError(Exception):
    """An error the user can fix (a bad argument, a model that cannot be loaded)."""
