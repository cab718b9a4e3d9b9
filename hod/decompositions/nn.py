"""hod decompositions: nn ops (being written)."""

from __future__ import annotations
