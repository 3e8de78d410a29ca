"""argparse types shared by `convoy` and its subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def number(kind: type[float] | type[int], low: float, *, strict: bool) -> Callable[[str], float]:
    """A number above `low` (strict) or from it, else a usage error naming the value."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if value != value or value < low or (strict and value == low):  # NaN too
            raise argparse.ArgumentTypeError(
                f"'{text}' must be {'above' if strict else 'at least'} {low:g}"
            )
        return value

    return parse
