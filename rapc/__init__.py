"""rapc: robustness-aware pruning and compression of CNNs, shipped to the GPU."""

from rapc.errors import RapcError
from rapc.modelio import load_model

__all__ = ["RapcError", "load_model"]
