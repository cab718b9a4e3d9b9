"""Derivative rules, one module per op family, collected in :data:`RULES`."""

from . import elementwise, linalg, nn, reductions, shape  # noqa: F401 - fill the table
from ._registry import RULES, Rule

__all__ = ["RULES", "Rule"]
