"""How counts are written in messages and tables: plurals and SI-prefixed numbers (no torch: the
command line's help and messages use it before anything heavy is imported)."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` and ``noun`` in agreement: ``1 step``, ``4 steps``, ``0 steps`` (``nouns``: an irregular
    plural; default: ``noun + "s"``)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def format_count(value: float, unit: str = "", digits: int = 4) -> str:
    """1.2345e13 -> '12.35T' (SI prefixes, ``digits`` significant digits)."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g}{prefix}{unit}"
    return f"{value:.{digits}g}{unit}"
