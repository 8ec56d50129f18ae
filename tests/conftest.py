"""Test-session set-up shared by every test file."""

import os

# The Triton kernels are tested on CPU tensors through Triton's interpreter, which must be
# switched on before triton is first imported (peft, imported by many tests, imports it via
# torch). On a CUDA machine the interpreter is left off unless asked for.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
