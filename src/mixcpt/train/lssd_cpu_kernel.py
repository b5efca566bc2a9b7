"""The fused CPU kernels of the teacher's vocabulary-wide work (`lssd_cpu_kernel.c`), built on
first use.

`targets.TeacherRows.chunk` calls `teacher_target` when `applies` says so (CPU, float32,
contiguous), and otherwise runs its eager PyTorch code, which is also the reference the tests hold
the kernel to; likewise `teacher_cache.top_k_logprobs` calls `teacher_top_k` (the teacher cache's
top-k) when `top_k_applies`. Why kernels: eager PyTorch makes five to seven passes over a [chunk,
V] tensor that has left the cache; a kernel does all of them a row at a time while the row is in
L1/L2 (timings in benchmarks/RESULTS.md).

The C source is compiled once per source, compiler and CPU (`-march=native`) with the system C
compiler (`$CC`, else `cc`) into `$XDG_CACHE_HOME/mixcpt/kernels` (default `~/.cache`), written
atomically, and loaded with ctypes; its OpenMP threads are libgomp's, the runtime PyTorch's CPU
build already loaded, so no second thread pool competes with PyTorch's (with gcc). Without a
working compiler the eager path is used and one warning says why; `MIXCPT_CPU_KERNEL=0` chooses it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = "lssd_cpu_kernel.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
if platform.machine() in ("x86_64", "AMD64"):
    # use AVX-512 where there is one (gcc and clang default to 256-bit)
    FLAGS.append("-mprefer-vector-width=512")


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixcpt" / "kernels"


def _cpu_identity() -> str:
    """What `-march=native` depends on: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built if missing), or None when it cannot be had (warned once)."""
    if os.environ.get("MIXCPT_CPU_KERNEL", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning(
            "no C compiler (CC, cc) found: the teacher target uses its eager CPU path (slower)"
        )
        return None
    source = resources.files("mixcpt.train").joinpath(SOURCE).read_bytes()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256(
            b"\0".join(
                x.encode() if isinstance(x, str) else x
                for x in (source, compiler, version, *FLAGS, _cpu_identity())
            )
        ).hexdigest()[:16]
        path = cache_folder() / f"lssd_cpu_kernel-{key}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                (Path(tmp) / SOURCE).write_bytes(source)
                built = Path(tmp) / path.name
                run = subprocess.run(
                    [compiler, *FLAGS, SOURCE, "-o", built.name, "-lm"],
                    cwd=tmp,
                    capture_output=True,
                    text=True,
                )
                if run.returncode != 0:
                    lines = run.stderr.strip().splitlines() or ["?"]
                    raise OSError(
                        f"{compiler} failed: {next((x for x in lines if 'error' in x), lines[-1])}"
                    )
                os.replace(built, path)  # atomic: another process may be building the same file
            log.info("built the fused teacher-target CPU kernel: %s", path)
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.warning(
            "could not build the fused CPU kernel (%s): the teacher target uses its eager CPU path",
            e,
        )
        return None
    lib.teacher_target.restype = None
    lib.teacher_target.argtypes = (
        [ctypes.c_void_p] * 4
        + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_float]
        + [ctypes.c_void_p] * 4
        + [ctypes.c_int]
    )
    lib.teacher_top_k.restype = None
    lib.teacher_top_k.argtypes = (
        [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
        + [ctypes.c_void_p] * 5
        + [ctypes.c_int]
    )
    return lib


def applies(z: torch.Tensor, log_p: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether `teacher_target` takes these [c, V] tensors: float32, contiguous, on the CPU, and
    the kernel could be built."""
    tensors = (z, log_p, grad)
    return (
        all(
            t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
            for t in tensors
        )
        and z.shape == log_p.shape == grad.shape
        and library() is not None
    )


# the kernel's codes of `cpt.objective`
OBJECTIVES = {"lssd": 0, "kl": 1, "mft": 2}


def teacher_target(
    z: torch.Tensor,
    log_p: torch.Tensor,
    grad: torch.Tensor,
    q_scale: float,
    labels: torch.Tensor,
    objective: str = "lssd",
    threshold: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `targets.TeacherRows.chunk` from the teacher's logits: z, log_p, grad [c, V] (grad
    holding p, turned in place into p - q_scale * q, q the `objective`'s target), labels [c] in
    [0, V). Returns (sum over rows of KL(q || p), of KL(t || p), both in log_p's dtype, teacher
    top-1 matches)."""
    rows, v = z.shape
    labels = labels.to(torch.int64).contiguous()
    if rows and (labels.min() < 0 or labels.max() >= v):  # the kernel indexes with them unchecked
        raise IndexError(
            f"labels must be in [0, {v}), got {labels.min().item()}..{labels.max().item()}"
        )
    threads = torch.get_num_threads()
    scratch = torch.empty(threads, v)  # each thread's exp(z - max) row
    kl, kl_base = torch.empty(rows, dtype=torch.float64), torch.empty(rows, dtype=torch.float64)
    top1 = torch.empty(rows, dtype=torch.int64)
    library().teacher_target(
        z.data_ptr(),
        log_p.data_ptr(),
        grad.data_ptr(),
        labels.data_ptr(),
        rows,
        v,
        OBJECTIVES[objective],
        q_scale,
        threshold,
        scratch.data_ptr(),
        kl.data_ptr(),
        kl_base.data_ptr(),
        top1.data_ptr(),
        threads,
    )
    return kl.sum().to(log_p.dtype), kl_base.sum().to(log_p.dtype), (top1 == labels).sum()


def top_k_applies(z: torch.Tensor, k: int) -> bool:
    """Whether `teacher_top_k` takes these [c, V] logits: float32, contiguous, on the CPU,
    0 < k < V, and the kernel could be built."""
    return (
        z.device.type == "cpu"
        and z.dtype == torch.float32
        and z.dim() == 2
        and z.is_contiguous()
        and 0 < k < z.shape[1]
        and library() is not None
    )


def teacher_top_k(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `teacher_cache.top_k_logprobs` on logits z [c, V] (temperature already applied):
    (log-probabilities [c, k] most likely first, their ids [c, k], log of the remaining mass [c]),
    float32, int64 and float32."""
    rows, v = z.shape
    threads = torch.get_num_threads()
    # each thread's candidates, up to V (float value, int64 index) entries of 16 bytes, and its
    # V / 16 + 1 group maxima
    candidates = torch.empty(threads * v * 2, dtype=torch.int64)
    maxima = torch.empty(threads * (v // 16 + 1))
    values, ids = torch.empty(rows, k), torch.empty(rows, k, dtype=torch.int64)
    tail = torch.empty(rows)
    library().teacher_top_k(
        z.data_ptr(),
        rows,
        v,
        k,
        values.data_ptr(),
        ids.data_ptr(),
        tail.data_ptr(),
        candidates.data_ptr(),
        maxima.data_ptr(),
        threads,
    )
    return values, ids, tail
