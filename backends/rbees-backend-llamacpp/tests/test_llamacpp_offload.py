"""llama.cpp's model parameters for a model larger than one GPU (issue 22, item 5), set on
llama-cpp-python's real ``llama_model_params`` (no GPU needed: nothing is loaded)."""

from __future__ import annotations

import llama_cpp
import pytest
from rbees_backend_llamacpp.backend import LlamaCppBackend
from rbees_backend_llamacpp.offload import (
    ALL_LAYERS,
    SPLIT_MODE_LAYER,
    SPLIT_MODE_NONE,
    set_devices,
)

from rbees_core.errors import InvalidParamsError


def params() -> llama_cpp.llama_model_params:
    return llama_cpp.llama_model_default_params()


def test_cpu_and_a_whole_gpu() -> None:
    p = params()
    assert set_devices(llama_cpp, p, kind="cpu", index=0, n_gpu_layers=None,
                       tensor_split=None) is None
    assert p.n_gpu_layers == 0
    p = params()
    set_devices(llama_cpp, p, kind="cuda", index=1, n_gpu_layers=None, tensor_split=None)
    assert (p.n_gpu_layers, p.main_gpu, p.split_mode) == (ALL_LAYERS, 1, SPLIT_MODE_NONE)


def test_part_of_the_layers_on_one_gpu() -> None:
    p = params()
    set_devices(llama_cpp, p, kind="cuda", index=0, n_gpu_layers=12, tensor_split=None)
    assert (p.n_gpu_layers, p.main_gpu, p.split_mode) == (12, 0, SPLIT_MODE_NONE)


def test_a_split_across_gpus_by_layer() -> None:
    p = params()
    kept = set_devices(llama_cpp, p, kind="cuda", index=0, n_gpu_layers=None,
                       tensor_split=(0.667, 0.333))
    assert (p.n_gpu_layers, p.main_gpu, p.split_mode) == (ALL_LAYERS, 0, SPLIT_MODE_LAYER)
    assert kept is not None and len(kept) == llama_cpp.LLAMA_MAX_DEVICES
    assert [round(p.tensor_split[i], 3) for i in range(3)] == [0.667, 0.333, 0.0]
    with pytest.raises(InvalidParamsError, match="--tensor-split"):
        set_devices(llama_cpp, params(), kind="cuda", index=0, n_gpu_layers=None,
                    tensor_split=[0.1] * (llama_cpp.LLAMA_MAX_DEVICES + 1))


def test_the_backend_says_it_offloads() -> None:
    assert LlamaCppBackend.offloads
