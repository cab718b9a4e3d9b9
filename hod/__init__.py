"""hod: higher-order derivatives for PyTorch, generated once per input signature.

``hod.derivative(f, order=n)`` returns a function computing the n-th derivative tensors
of ``f``, equal to nested ``torch.func`` transforms, as straight-line generated code.
"""

from ._api import (
    DEFAULT_MEMORY_LIMIT,
    DerivativeFunction,
    derivative,
    derivatives,
    hessian,
    jacobian,
)
from ._build import Lowered
from ._chunked import ChunkedFunction
from ._operators import OperatorFunction, biharmonic, laplacian, operator
from ._sparse import SparseFunction
from ._taylor_api import SeriesFunction, hvp, jet
from .errors import (
    CompileError,
    HodError,
    InputError,
    MemoryLimitError,
    OutputError,
    TracingError,
    UnsupportedOperatorError,
)

__all__ = [
    "ChunkedFunction",
    "CompileError",
    "DEFAULT_MEMORY_LIMIT",
    "DerivativeFunction",
    "HodError",
    "InputError",
    "Lowered",
    "MemoryLimitError",
    "OutputError",
    "TracingError",
    "UnsupportedOperatorError",
    "OperatorFunction",
    "SeriesFunction",
    "SparseFunction",
    "biharmonic",
    "derivative",
    "derivatives",
    "hessian",
    "hvp",
    "jacobian",
    "jet",
    "laplacian",
    "operator",
]

__version__ = "0.1.0"
