"""Rating and routing: what a call costs, how long money lasts, and which
trunks carry it.

``rates``: one rate's terms; ``periods``: rates by time of day and day of
week; ``decks``: reading decks from CSV; ``routes``: least-cost routing.
"""
from .periods import Clock, Plan
from .rates import MAX_DIGITS, Rate, normalize_destination, prefixes_of

__all__ = ["Clock", "Plan", "MAX_DIGITS", "Rate", "normalize_destination", "prefixes_of"]
