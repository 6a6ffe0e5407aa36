"""pymeta: fast batched meta-learning for PyTorch.

Fused native kernels (C++ on CPU, CUDA on GPU) for the MAML family's inner loop over many
tasks at once, with pure-PyTorch references as the fallback and test oracle.
"""
from __future__ import annotations

import torch

from pymeta import models, ops, reference, tasks
from pymeta import distributed
from pymeta._backend import get_backend, set_backend, use_backend
from pymeta import _backend
from pymeta._io import FileFormatError
from pymeta.lstm_optimizer import LSTMOptimizer, LSTMOptimizerNet
from pymeta.maml import MAML
from pymeta.meta_train import meta_train

__version__ = "0.1.0"

__all__ = ["MAML", "LSTMOptimizerNet", "LSTMOptimizer", "meta_train", "FileFormatError", "models",
           "tasks", "distributed", "info", "get_backend", "set_backend", "use_backend", "ops", "reference",
           "__version__"]


def info() -> dict:
    """What this install of pymeta can do: versions, which native kernels are compiled in,
    whether a GPU is present now, and the active backend."""
    b = _backend.BUILD_INFO
    archs = b.get("cuda_archs") or ""
    return {
        "pymeta": __version__,
        "torch": torch.__version__,
        "torch_built_against": b.get("torch_version"),
        "native": _backend.NATIVE,
        "cpu_kernels": bool(b.get("cpu_kernels")),
        "cuda_kernels": bool(b.get("cuda_kernels")),
        "cuda_archs": [a for a in archs.split(",") if a],
        "cuda_available": torch.cuda.is_available(),
        "backend": get_backend(),
        **({"native_import_error": _backend.IMPORT_ERROR} if _backend.IMPORT_ERROR else {}),
    }
