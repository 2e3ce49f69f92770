"""Optional compiled CPU kernels, built on first use with the machine's C++ compiler.

``silu_attention()`` returns the extension built from ``silu_attention.cpp`` (float32, CPU): HSTU's
causal SiLU attention forward and backward (``causal_silu_attention[_backward]``, training included,
in the (B, L) grid or on packed tokens), at inference the middle of a layer (``hstu_attention_gate``)
and its input norm (``layer_norm``), and for every model's training a dropout whose mask is hashed from
a seed (``hashed_dropout``, genrec/models/layers.py) and the sampled-softmax loss with its gradients in
one pass (``sampled_softmax``, ``hashed_negatives``; genrec/losses). On CPUs with AVX512-BF16 it also has
HSTU's training attention on bf16 dot products for bf16 autocast (``silu_attention_bf16[_backward]``,
``attention_bf16.h``; ``has_bf16_attention()`` says whether it was built). It returns None when the extension cannot
be used; callers then take the stock PyTorch path, which computes the same functions
(tests/test_kernels.py checks that they agree). The first call compiles it (about a minute, once per machine: PyTorch caches the build in
``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and says so on stderr.

``GENREC_KERNELS`` selects: ``auto`` (default: use the kernel when it builds, otherwise warn once and
fall back), ``off`` (never build or use it), ``require`` (raise if it cannot be built). The build uses
``-march=native``; the extension's name carries a fingerprint of the CPU's features, so machines that
share a home directory never load each other's builds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("silu_attention.cpp")
_MODES = ("auto", "off", "require")
_state: dict[str, object] = {}  # "module": the extension or None once decided; "error": why not
_override: list[bool | None] = [None]
_building = threading.Lock()


def mode() -> str:
    value = os.environ.get("GENREC_KERNELS", "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"GENREC_KERNELS={value!r}: choose one of {', '.join(_MODES)}")
    return value


def can_build() -> bool:
    """Whether this machine has what the build needs: a C++ compiler (``$CXX`` or ``c++``) and ninja."""
    import shutil

    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is not None and is_ninja_available()


def _cpu_fingerprint() -> str:
    """The CPU's feature flags (what -march=native compiles for), hashed with the sources (the .cpp and the
    headers it includes) and torch version."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        flags += platform.processor()
    sources = "".join(p.read_text() for p in sorted(_SOURCE.parent.glob("*.[ch]*")) if p.suffix in (".cpp", ".h"))
    digest = hashlib.sha1((flags + torch.__version__ + sources).encode()).hexdigest()
    return digest[:12]


def _build():
    import fcntl  # POSIX only: Windows is refused below before it is needed

    from torch.utils import cpp_extension

    if sys.platform == "win32":
        raise RuntimeError("the kernel is built with GCC or Clang vector extensions; not on Windows")
    cflags = ["-O3", "-march=native", "-ffp-contract=fast"]
    ldflags = []
    if sys.platform.startswith("linux"):  # Apple's clang has no OpenMP: one thread per call there
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    name = f"genrec_silu_attention_{_cpu_fingerprint()}"
    build_dir = Path(cpp_extension._get_build_directory(name, False))
    if not any(build_dir.glob(f"{name}*.so")):
        print("genrec: compiling the CPU kernels (attention, loss, dropout; once per machine, about a minute; "
              "GENREC_KERNELS=off skips it)", file=sys.stderr, flush=True)
    # PyTorch guards the build directory with a lock file that a killed process leaves behind, after which
    # every later load waits forever. genrec's processes take an flock first (the OS releases it when its
    # holder dies), so whoever holds it is the only one that can be building: a lock file found then is stale.
    with open(build_dir / "genrec.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        return cpp_extension.load(name, [str(_SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags,
                                  build_directory=str(build_dir), verbose=False)


def silu_attention():
    """The compiled extension, or None (disabled, failed to build: warned once per process; or built
    without OpenMP, as with Apple's clang, while PyTorch uses several threads: the stock path is then faster)."""
    if _override[0] is False or (_override[0] is None and mode() == "off"):
        return None
    if "module" not in _state:
        with _building:  # the server's worker threads may all ask at once: one build
            if "module" not in _state:
                _state.update(_decide(mode()))
    module = _state["module"]
    if module is not None and not module.built_with_openmp() and torch.get_num_threads() > 1:
        return None
    return module


def _decide(current: str) -> dict:
    """{"module": extension or None, "error": why not}."""
    try:
        return {"module": _build()}
    except Exception as exc:  # compiler missing, headers missing, unsupported platform
        error = f"{type(exc).__name__}: {exc}"
        if current == "require":
            raise RuntimeError(f"GENREC_KERNELS=require but the CPU kernel did not build: {exc}") from exc
        warnings.warn(f"genrec's CPU kernels did not build ({error.splitlines()[0]}); using the stock "
                      "PyTorch path (the same computations, slower). Set GENREC_KERNELS=off to skip the attempt.",
                      RuntimeWarning, stacklevel=3)
        return {"module": None, "error": error}


def applies(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernel can compute on these tensors: plain CPU float32 tensors, outside forward-mode
    autodiff and torch.func transforms (the kernel has neither tangents nor batching rules)."""
    if torch.autograd.forward_ad._current_level >= 0:
        return False
    return all(t is None or (type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.float32
                             and not torch._C._functorch.is_functorch_wrapped_tensor(t)) for t in tensors)


@contextlib.contextmanager
def use_kernels(enabled: bool):
    """Force the kernels on (build if needed, whatever GENREC_KERNELS says) or off inside the block
    (the tests and benchmarks compare the two paths with it)."""
    previous = _override[0]
    _override[0] = enabled
    try:
        yield
    finally:
        _override[0] = previous
