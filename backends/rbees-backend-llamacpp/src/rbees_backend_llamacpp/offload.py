"""Where llama.cpp puts a model's layers: one GPU, part of one GPU, several GPUs, or this
host's device and the devices of RPC servers (a sharded worker, :func:`set_remote_devices`).

rbees-workerd passes ``--n-gpu-layers``, ``--tensor-split`` and ``--rpc`` (decided by the
placement planner, :mod:`rbees_core.planning`) to :meth:`LlamaCppBackend.load`, which sets
llama.cpp's model parameters with :func:`set_devices` before it loads the file.
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


def shard_layers(n_layer: int, shares: Sequence[float]) -> int:
    """How many of llama.cpp's ``n_layer + 1`` offloadable layers (the repeating ones and
    the output layer) go to the remote devices when the local CPU keeps ``shares[0]`` of
    the model and the remotes ``shares[1:]``: llama.cpp gives the *last* ``n_gpu_layers``
    layers to the devices of ``llama_model_params.devices``, the first ones stay on the
    CPU. At least one layer goes remote (else there is no shard)."""
    total = sum(shares)
    if total <= 0:
        from rbees_core.errors import InvalidParamsError

        raise InvalidParamsError("--tensor-split", "the shares of a shard must not all be 0")
    slots = n_layer + 1
    remote = round(slots * (total - shares[0]) / total)
    return max(1, min(slots, remote))


def set_remote_devices(lib: Any, mparams: Any, *, kind: str, index: int, n_layer: int,
                       endpoints: Sequence[str], tensor_split: Sequence[float] | None
                       ) -> tuple[Any, ...]:
    """Set ``mparams`` for a model sharded over this host's ``kind:index`` and the devices
    of the RPC servers at ``endpoints`` (:mod:`rbees_backend_llamacpp.rpc`), by layer:
    ``tensor_split`` gives the local device's share first, then each server's (None: each
    one's free memory, as llama.cpp's own default). On the CPU the first layers stay local
    (:func:`shard_layers`), on a GPU the local GPU is the first device of the list. Returns
    what must live as long as the parameters (the device list, the split) and the shares.
    Raises :class:`rbees_core.errors.ModelLoadError` for a server that does not answer."""
    from rbees_backend_llamacpp import rpc
    from rbees_core.errors import InvalidParamsError

    g = rpc.ggml()
    remote = rpc.remote_devices(endpoints)
    local = g.local_device(kind, index)
    if tensor_split is None:
        shares = [float(g.memory(d)[0]) for d in (local, *remote)]
    else:
        shares = [float(s) for s in tensor_split]
        if len(shares) != len(remote) + 1:
            raise InvalidParamsError(
                "--tensor-split", f"a shard over {len(remote)} remote device(s) takes "
                f"{len(remote) + 1} shares: this host's device first, then each remote one")
    count = int(getattr(lib, "LLAMA_MAX_DEVICES", 16))
    if kind == "cpu":
        devices, split = remote, shares[1:]
        mparams.n_gpu_layers = shard_layers(n_layer, shares)
    else:
        devices, split = [local, *remote], shares
        mparams.n_gpu_layers = ALL_LAYERS
    if len(devices) > count:
        raise InvalidParamsError("--rpc", f"llama.cpp splits over at most {count} devices")
    if not any(split):
        split = [1.0] * len(devices)
    array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
    weights = (ctypes.c_float * count)(*split)
    mparams.devices = ctypes.addressof(array)
    mparams.split_mode = SPLIT_MODE_LAYER
    mparams.main_gpu = 0
    mparams.tensor_split = weights
    return array, weights, tuple(shares)
