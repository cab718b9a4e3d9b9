"""Op database entries: shape (being written)."""

from __future__ import annotations
