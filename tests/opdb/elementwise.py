"""Op database entries: elementwise (being written)."""

from __future__ import annotations
