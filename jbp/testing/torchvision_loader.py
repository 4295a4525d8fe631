"""torchvision for the tests and the benchmark, on a CPU torch whose build torchvision's compiled
ops do not match.

torchvision 0.28.0 (the release of torch 2.13.0) ships ``_C.so`` built for the CUDA torch; on the
CPU build it does not load, which ``torchvision.extension`` tolerates (``_has_ops()`` is then
False and every ``register_meta`` of ``torchvision/_meta_registrations.py`` is skipped), but the
same file also registers a fake kernel for ``torchvision::nms`` unconditionally
(``@torch.library.register_fake("torchvision::nms")``), and with no such operator defined,
``import torchvision`` fails with "RuntimeError: operator torchvision::nms does not exist".

Those registrations only give torch.compile the output shapes of detection ops (nms, roi_align,
...); the classification models are pure Python (``torch.nn`` modules). So when, and only when,
that import fails, :func:`torchvision` imports the package again with ``_meta_registrations``
replaced by an empty module: everything else of torchvision is its own code, unpatched. Where
the compiled ops do load (a matching build), the plain import succeeds and nothing is replaced.
``tests/test_torch_weights.py`` and ``scripts/bench.py`` import it through :func:`torchvision`.
"""

from __future__ import annotations

import sys
import types

_MISSING_OP = "operator torchvision::nms does not exist"


def torchvision():
    """The ``torchvision`` package (module docstring). Raises ImportError without torch or
    torchvision (the ``[torch]`` extra)."""
    try:
        import torchvision as tv  # noqa: PLC0415
        return tv
    except RuntimeError as e:
        if _MISSING_OP not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]                    # the half-imported package
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations")
    import torchvision as tv  # noqa: PLC0415
    return tv
