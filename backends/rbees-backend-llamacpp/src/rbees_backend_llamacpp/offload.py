"""Where llama.cpp puts a model's layers: one GPU, part of one GPU, or several GPUs.

rbees-workerd passes ``--n-gpu-layers`` and ``--tensor-split`` (decided by the placement
planner, :mod:`rbees_core.planning`) to :meth:`LlamaCppBackend.load`, which sets llama.cpp's
model parameters with :func:`set_devices` before it loads the file.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

#: llama.cpp's n_gpu_layers for "every layer, the output one too"
ALL_LAYERS = 999
#: llama_split_mode
SPLIT_MODE_NONE = 0
SPLIT_MODE_LAYER = 1


def set_devices(lib: Any, mparams: Any, *, kind: str, index: int, n_gpu_layers: int | None,
                tensor_split: Sequence[float] | None) -> Any:
    """Set ``mparams`` (a ``llama_model_params``) for a model on ``kind:index``: on the CPU
    no layer on a GPU; on a GPU ``n_gpu_layers`` of it (None: all), on that GPU alone, or
    split by layer over the GPUs by ``tensor_split`` (each one's share, by index). Returns
    what must live as long as the parameters (the ctypes array of the split), or None."""
    if kind == "cpu":
        mparams.n_gpu_layers = 0
        return None
    mparams.n_gpu_layers = ALL_LAYERS if n_gpu_layers is None else int(n_gpu_layers)
    mparams.main_gpu = index
    if not tensor_split:
        mparams.split_mode = SPLIT_MODE_NONE  # the whole model on one device
        return None
    count = int(getattr(lib, "LLAMA_MAX_DEVICES", 16))
    if len(tensor_split) > count:
        from rbees_core.errors import InvalidParamsError

        raise InvalidParamsError("--tensor-split", f"llama.cpp splits over at most {count} GPUs")
    shares = (ctypes.c_float * count)(*(float(s) for s in tensor_split))
    mparams.split_mode = SPLIT_MODE_LAYER
    mparams.tensor_split = shares
    return shares
