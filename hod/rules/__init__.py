"""Derive stage: the derivative rules, one module per op family, collected in :data:`RULES`."""

from . import (  # noqa: F401 - importing a family fills the table
    activations,
    elementwise,
    indexing,
    linalg,
    nn,
    reductions,
    shape,
)
from ._registry import RULES, Rule

__all__ = ["RULES", "Rule"]
