"""nn.Linear with a faster path for the one-row inputs of batch-1 decoding on CPU.

For one row, torch's linear calls a BLAS matrix-vector kernel that reads the weights at 10-25 % of
the memory bandwidth (AVX-512 AMD EPYC, also with ATEN_CPU_CAPABILITY=avx2), while a batched matrix
multiply over k slices of the weight (W viewed (k, out/k, in)) against the vector runs at the
bandwidth: GPT-2 124M's 48 block matrices in 10.8 ms against 24.2 ms with linear (BENCHMARKS.md).
Under torch.compile the product is a multiply and a sum, which Inductor turns into one loop over the
weights. Everything else (training, many rows, GPU, autocast) is plain linear; the parameters and
their names are nn.Linear's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_SLICES = 4  # k: any k >= 2 reaches the bandwidth (k = 1 is the matrix-vector kernel again)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, out = self.weight, self.out_features
        if (x.numel() != x.shape[-1] or x.device.type != "cpu" or torch.is_grad_enabled()
                or out % _SLICES or x.dtype != w.dtype or type(w.data) is not torch.Tensor
                or torch.is_autocast_enabled("cpu")):
            return F.linear(x, w, self.bias)
        if torch.compiler.is_compiling():
            y = (w * x.reshape(1, -1)).sum(-1)  # (out,)
            y = y if self.bias is None else y + self.bias
        else:
            # The vector as (k, in, 1) with strides (0, 1, in): the layout the fast kernel takes.
            v = x.reshape(1, 1, -1).expand(_SLICES, -1, -1).transpose(1, 2)  # (k, in, 1)
            w = w.view(_SLICES, out // _SLICES, -1)  # (k, out/k, in)
            y = torch.bmm(w, v) if self.bias is None else torch.baddbmm(self.bias.view(_SLICES, -1, 1), w, v)
        return y.view(*x.shape[:-1], out)  # (..., out)
