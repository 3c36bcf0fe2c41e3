"""Layer solvers. Importing this package registers every built-in solver."""
from . import rtn  # noqa: F401  (registers "rtn")
from . import gptq, quantease  # noqa: F401  (register "gptq", "quantease")
from .base import Outliers, QuantizedWeight, SolveResult, get_solver, layer_loss, solver_names
from .grid import Grid, GridSpec, fit_grid

__all__ = ["Grid", "GridSpec", "Outliers", "QuantizedWeight", "SolveResult", "fit_grid", "get_solver", "layer_loss",
           "solver_names"]
