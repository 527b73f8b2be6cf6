"""Counting the aten ops a step dispatches (bench/op_count.py's counter).

A `TorchDispatchMode` sits below autograd, so it sees every op of forward, backward and the optimizer,
one call per kernel the same code would launch on a GPU (a handful of ops launch none or two; the
figure is a count of dispatches, not of launches). Categories:

    kernel-like   every aten op except views (aliases of their input) and allocations (empty*)
    matmul-class  mm / addmm / bmm / baddbmm / convolution(+backward) / scaled-dot-product attention(+backward)
    dtype copy    _to_copy or copy_ that changes the dtype
    layout copy   clone, or _to_copy / copy_ within one dtype
    host sync     _local_scalar_dense (.item(), float(t)), nonzero, is_nonzero, equal

`CudaAutocastRules` makes CUDA autocast's casts on any device, so a CPU run counts the ops the GPU
path dispatches under torch.autocast("cuda"); each cast is counted as a dtype copy.
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "resize_"}
MATMUL = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "convolution", "convolution_backward", "_convolution",
          "_scaled_dot_product")
SYNC = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "item"}
COLUMNS = ("kernel", "matmul", "dtype_copy", "layout_copy", "host_sync")
# CUDA autocast's rules (torch's autocast_mode.cpp), by the name of the torch function called: ops run
# in the low-precision dtype, and ops run in fp32 (their low-precision inputs cast up).
CUDA_LOW = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
            "matmul", "__matmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "scaled_dot_product_attention"}
CUDA_FP32 = {"group_norm", "layer_norm", "pow", "__pow__", "__rpow__", "exp", "expm1", "log", "log2", "log10", "log1p",
             "rsqrt", "reciprocal", "softplus", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "logsumexp",
             "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "nll_loss", "kl_div", "cdist", "dist", "renorm",
             "binary_cross_entropy_with_logits", "cosine_similarity"}
LOW = (torch.float16, torch.bfloat16)


class CudaAutocastRules(TorchFunctionMode):
    """torch.autocast("cuda", dtype)'s casts, made by hand on any device: CPU autocast's lists differ
    (CUDA runs the norms in fp32), so a count under CPU autocast would not be the GPU's op graph. The
    casts it makes dispatch as ordinary `_to_copy` ops, which an OpCounter inside it counts."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in CUDA_LOW:
            wanted, cast = self.dtype, lambda t: t.is_floating_point() and t.dtype != self.dtype
        elif name in CUDA_FP32:
            wanted, cast = torch.float32, lambda t: t.dtype in LOW
        else:
            return func(*args, **kwargs)

        def fix(a):
            return a.to(wanted) if isinstance(a, torch.Tensor) and cast(a) else a

        return func(*[fix(a) for a in args], **{k: fix(v) for k, v in kwargs.items()})


def _name(func) -> str:
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


def _dtype_of(x):
    return x.dtype if isinstance(x, torch.Tensor) else None


def _caller() -> str:
    """The innermost frame outside torch itself: 'package/file.py:line function'."""
    frame = sys._getframe(3)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/torch/" not in path and "opcount_mode" not in path:  # CudaAutocastRules' casts: its caller
            parts = Path(path).parts
            return f"{'/'.join(parts[-2:])}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class OpCounter(TorchDispatchMode):
    """Counts ops by phase (`counter.phase = "forward"` etc.) and category; see the module docstring."""

    def __init__(self):
        super().__init__()
        self.phase = "step"
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.ops: collections.Counter = collections.Counter()
        self.dtype_sources: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(func, torch._ops.OpOverload) or func.namespace not in ("aten",):
            return out
        name = _name(func)
        if func.is_view or name in ALLOC:
            return out
        c = self.counts[self.phase]
        c["kernel"] += 1
        self.ops[name] += 1
        if name.startswith(MATMUL):
            c["matmul"] += 1
        if name in SYNC:
            c["host_sync"] += 1
        if name in ("_to_copy", "copy_", "clone"):
            src = _dtype_of(args[1] if name == "copy_" else args[0])
            dst = kwargs.get("dtype", src) if name != "copy_" else _dtype_of(args[0])
            if name != "clone" and dst is not None and dst != src:
                c["dtype_copy"] += 1
                self.dtype_sources[f"{src}->{dst} at {_caller()}".replace("torch.", "")] += 1
            else:
                c["layout_copy"] += 1
        return out

    def total(self) -> collections.Counter:
        return sum(self.counts.values(), collections.Counter())

    def table(self, title: str, top: int = 6) -> str:
        """Rows per phase and a total, then the top sources of dtype copies."""
        lines = [f"{title}", f"  {'phase':12s}" + "".join(f"{c:>13s}" for c in COLUMNS)]
        for phase, c in [*self.counts.items(), ("TOTAL", self.total())]:
            lines.append(f"  {phase:12s}" + "".join(f"{c[k]:13,d}" for k in COLUMNS))
        if self.dtype_sources:
            lines.append("  top sources of dtype copies:")
            lines += [f"    {n:5d}  {src}" for src, n in self.dtype_sources.most_common(top)]
        return "\n".join(lines)
