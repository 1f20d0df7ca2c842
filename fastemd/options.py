"""argparse types for every subcommand's options: each integer has its range, each number is finite,
so that a value numpy, torch or memory cannot take is a one-line error, not a traceback later."""

from __future__ import annotations

import argparse

from fastemd.config import SEED_MAX


def int_in(low: int, high: int, why: str = ""):
    """argparse type: an integer from `low` to `high` (every integer option has a range: a value
    that numpy, torch or memory cannot take is a one-line error, not a traceback later)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            reason = f" ({why})" if why else ""
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}{reason}, got {text}")
        return value

    parse.__name__ = f"integer from {low} to {high}"  # argparse names the type in its messages
    return parse


OPTION_MAX = 10**9  # counts and sizes that have no tighter bound of their own
positive_int = int_in(1, OPTION_MAX)
nonneg_int = int_in(0, OPTION_MAX)
seed_int = int_in(0, SEED_MAX)  # what numpy's and torch's seeding both take


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def nonneg_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def positive_int_list(text: str) -> list[int]:
    """argparse type: a comma list of ints >= 1 (at least one)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers from 1 to {OPTION_MAX}, "
                                         f"got {text!r}") from None
    if not values or min(values) < 1 or max(values) > OPTION_MAX:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers from 1 to {OPTION_MAX}, got {text!r}")
    return values
