"""Exceptions raised by hod. Every message starts with the public call that failed."""

from __future__ import annotations


class HodError(Exception):
    """Base class of every error hod raises on purpose."""


class UnsupportedOperatorError(HodError, NotImplementedError):
    """The traced function uses an ATen operator that hod has no derivative rule for."""


class TracingError(HodError):
    """The function could not be traced to a static ATen graph (control flow, mutation, ...)."""


class InputError(HodError, TypeError):
    """An argument given to a hod transform or to the function it returned is unusable."""


class OutputError(HodError, TypeError):
    """The differentiated function returned something hod cannot differentiate."""


class MemoryLimitError(HodError, MemoryError):
    """A derivative tensor would exceed the configured memory limit.

    ``nbytes`` is the size of the tensor refused and ``limit`` the limit, when known;
    ``hinted`` says the message already suggests a ``chunk_size``.
    """

    def __init__(self, message: str, *, nbytes: int | None = None, limit: int | None = None,
                 hinted: bool = False) -> None:
        super().__init__(message)
        self.nbytes, self.limit, self.hinted = nbytes, limit, hinted


class CompileError(HodError, RuntimeError):
    """``torch.compile`` failed on the generated code (with ``compile=`` set)."""
