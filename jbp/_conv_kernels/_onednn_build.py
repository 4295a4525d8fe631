"""Build, cache and load the oneDNN convolution library (``onednn_conv.cc``); the backend switch.

The native part is compiled on first use with ``g++`` (or ``$CXX``) against the headers of
``jax.ffi.include_dir()`` and the PyPI wheels ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp``
2023.2.0 (extra ``jbp[onednn]``). The shared object is cached in ``$JBP_CACHE_DIR`` (default
``$XDG_CACHE_HOME/jbp``, else ``~/.cache/jbp``) under a name keyed by a hash of the source, the
jaxlib and oneDNN versions and the compiler, written to a temporary file and renamed into place,
so that two processes building at once cannot leave a half-written library.

Anything missing (the wheel, a compiler, a failed build) makes :func:`library` return ``None``
and warn once, in one line, why; the convolution then runs on XLA's forms. docs/onednn.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata as metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import NamedTuple, Optional

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
TARGETS = ("JbpDnnlConvForward", "JbpDnnlConvInputGrad", "JbpDnnlConvWeightGrad")
BACKENDS = ("xla", "onednn")
#: oneDNN where it is installed and builds: the faster train step on a quiet machine; "xla" is
#: the better choice on a heavily shared one (docs/onednn.md: "Use", "OpenMP on a shared machine").
DEFAULT_BACKEND = "onednn"
_ENV = "JBP_CONV_BACKEND"
_FLAGS = ("-O2", "-shared", "-fPIC", "-std=c++17", "-w")


class OneDNNUnavailableWarning(RuntimeWarning):
    """The oneDNN convolution kernels could not be loaded; XLA's convolutions are used."""


class Library(NamedTuple):
    path: str
    handle: ctypes.CDLL
    onednn_version: str


class _Unavailable(Exception):
    pass


_lock = threading.Lock()
_loaded: Optional[Library] = None
_reason: Optional[str] = None  # why the library is unavailable, once tried
_warned = False
_override: Optional[str] = None


# --- the switch ---------------------------------------------------------------------------------

def conv_backend() -> str:
    """The requested convolution backend: :func:`set_conv_backend`'s, else ``$JBP_CONV_BACKEND``,
    else :data:`DEFAULT_BACKEND`. ``"onednn"`` runs float32 CPU convolutions on oneDNN where the
    table chooses it (XLA's forms where it is unavailable)."""
    if _override is not None:
        return _override
    name = os.environ.get(_ENV, "").strip().lower() or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise ValueError(f"{_ENV}={os.environ[_ENV]!r}: expected one of {', '.join(BACKENDS)}")
    return name


def set_conv_backend(name: Optional[str]) -> None:
    """Choose the CPU convolution kernels: ``"onednn"`` or ``"xla"``; ``None`` goes back to
    ``$JBP_CONV_BACKEND`` (default :data:`DEFAULT_BACKEND`).

    The choice is made when a function is traced, so this clears JAX's caches of traced and
    compiled functions (``jax.clear_caches()``) when it changes the backend.
    """
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"set_conv_backend: expected one of {', '.join(BACKENDS)} or None, "
                         f"got {name!r}")
    before = conv_backend()
    _override = name
    if conv_backend() != before:
        import jax
        jax.clear_caches()


def active() -> bool:
    """True when the oneDNN kernels are requested and loaded (building them on first call)."""
    return conv_backend() == "onednn" and library() is not None


def describe() -> str:
    """Which kernels float32 convolutions run on, for headers, summaries and logs: ``"onednn
    <version>"``, ``"xla"``, or ``"xla (oneDNN unavailable)"``. On CPU this loads (on first use,
    builds) the oneDNN library; on an accelerator convolutions are XLA's."""
    import jax  # noqa: PLC0415
    if jax.default_backend() != "cpu" or conv_backend() == "xla":
        return "xla"
    lib = library()
    return f"onednn {lib.onednn_version}" if lib is not None else "xla (oneDNN unavailable)"


# --- finding the parts ---------------------------------------------------------------------------

def cache_dir() -> pathlib.Path:
    if os.environ.get("JBP_CACHE_DIR"):
        return pathlib.Path(os.environ["JBP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jbp"


def _wheel_file(dist: str, suffix: str) -> pathlib.Path:
    try:
        files = metadata.files(dist) or ()
    except metadata.PackageNotFoundError:
        raise _Unavailable(f"the {dist} wheel is not installed (pip install 'jbp[onednn]')")
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            path = pathlib.Path(f.locate()).resolve()
            if path.exists():
                return path
    raise _Unavailable(f"{suffix} not found in the {dist} wheel")


def _parts():
    """(compiler, libdnnl path, include dir, oneDNN version, jax include dir)."""
    lib = _wheel_file("onednn-cpu-gomp", "libdnnl.so.3")
    header = _wheel_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
    compiler = shutil.which(os.environ.get("CXX") or "g++")
    if compiler is None:
        raise _Unavailable(f"no C++ compiler ({os.environ.get('CXX') or 'g++'}) on PATH")
    import jax
    return (compiler, lib, header.parents[2], metadata.version("onednn-cpu-gomp"),
            jax.ffi.include_dir())


def _build(compiler, lib, include, version, jax_include) -> pathlib.Path:
    import jaxlib
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([
        source, jaxlib.__version__.encode(), version.encode(), compiler.encode(),
        str(lib).encode(), " ".join(_FLAGS).encode()])).hexdigest()[:16]
    out_dir = cache_dir()
    target = out_dir / f"libjbp_onednn_conv-{key}.so"
    if target.exists():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=out_dir)
        os.close(fd)
    except OSError as err:
        raise _Unavailable(f"cannot write the build cache {out_dir}: {err}")
    cmd = [compiler, *_FLAGS, str(SOURCE), "-o", tmp, f"-I{jax_include}", f"-I{include}",
           str(lib), f"-Wl,-rpath,{lib.parent}"]
    print(f"jbp: building the oneDNN convolution kernels (first use, ~10 s with g++; cached in "
          f"{out_dir})", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise _Unavailable(f"g++ failed (exit {done.returncode}): {last[:200]}")
        os.replace(tmp, target)  # atomic: a concurrent builder replaces it with the same bytes
    except subprocess.TimeoutExpired:
        raise _Unavailable("g++ took more than 600 s")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _gomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any(line.rstrip().endswith("/libgomp.so.1") for line in maps)
    except OSError:
        return False


def _load() -> Library:
    compiler, lib, include, version, jax_include = _parts()
    path = _build(compiler, lib, include, version, jax_include)
    # libgomp reads OMP_WAIT_POLICY once, when it is loaded: set it before loading libdnnl.
    # Without PASSIVE, oneDNN's idle OpenMP workers spin and halve XLA's own throughput.
    if not _gomp_loaded():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    handle = ctypes.CDLL(str(path))
    import jax
    for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(handle, name)),
                                    platform="cpu")
    handle.JbpDnnlConvSupported.restype = ctypes.c_int
    handle.JbpDnnlConvSupported.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p,
                                            ctypes.c_int64]
    handle.JbpDnnlScratchBytes.restype = ctypes.c_int64
    return Library(str(path), handle, version)


def library() -> Optional[Library]:
    """The loaded library, building it on first call; ``None`` (with one warning) if it cannot."""
    global _loaded, _reason, _warned
    if _loaded is not None or _reason is not None:
        return _loaded
    with _lock:
        if _loaded is None and _reason is None:
            try:
                _loaded = _load()
            except (_Unavailable, OSError) as err:
                _reason = str(err)
        if _reason is not None and not _warned:
            _warned = True
            warnings.warn_explicit(
                f"oneDNN convolution kernels unavailable ({_reason}); using XLA's convolutions",
                OneDNNUnavailableWarning, filename="jbp", lineno=0, module="jbp")
    return _loaded


def scratch_bytes() -> Optional[int]:
    """Bytes the oneDNN calls hold as scratch outside XLA's buffers (not in XLA's temp size)."""
    lib = _loaded
    return None if lib is None else int(lib.handle.JbpDnnlScratchBytes())


def unavailable_reason() -> Optional[str]:
    library()
    return _reason

