"""`python tests/llama_server.py ARGS...` runs `python -m llama_cpp.server ARGS...` with
llama.cpp's extra CPU buffer types off (`use_extra_bufts=False`: no AMX, no weight repack).

Why: on a machine whose CPU advertises AMX (Intel Sapphire Rapids and later) inside a VM
that does not let it run, llama.cpp's CPU backend picks its AMX matmul for the Q4_1 weights
and the server dies on the first completion with SIGILL (`tileloadd`, seen under gdb in
`ggml_backend_amx_mul_mat`), even after the process is granted AMX tile state. The extra
buffer types only speed the matmuls up; the answers are the model's either way. Used by
tests/test_judges_openai.py's real-server fixture.
"""

from __future__ import annotations

import runpy
import sys

import llama_cpp.llama_cpp as bindings

_default_params = bindings.llama_model_default_params


def _params():  # what llama_cpp.Llama starts from when it loads a model
    params = _default_params()
    params.use_extra_bufts = False
    return params


if __name__ == "__main__":
    bindings.llama_model_default_params = _params
    sys.argv = ["llama_cpp.server", *sys.argv[1:]]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
