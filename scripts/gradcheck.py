"""Check every hand-written backward rule in jbp, three ways, over the whole configuration grid.

For each case of ``jbp.testing.grid.CASES`` (a layer and one configuration) this prints one row:

- vs autodiff: the manual VJP against ``jax.vjp`` of ``jbp.autodiff`` (same forward, JAX's
  backward), in float32 and float64, under the same random cotangent;
- vs finite differences: central differences in float64, the full Jacobian for small cases and
  random directions for large ones;
- vs PyTorch: forward and autograd gradients of ``torch.nn.functional`` in float64, when torch is
  installed (``n/a`` where PyTorch has no identical operation, e.g. dropout's RNG).

Each cell is "max abs / max rel" error against that reference (see ``jbp.gradcheck``); the
float32 column passes or fails by jbp.accuracy's verdict (manual and autodiff each against
float64). Exits 1 if any case fails.

    python scripts/gradcheck.py                 # the whole grid
    python scripts/gradcheck.py --layer conv2d  # one layer
    python scripts/gradcheck.py --verbose       # per-argument tables for every check
"""

from __future__ import annotations

import argparse
import sys
import time

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)   # float64 for finite differences and the oracle

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jbp  # noqa: E402
from jbp import gradcheck  # noqa: E402
from jbp.testing.grid import CASES  # noqa: E402
from jbp.testing.torch_reference import torch_vjp  # noqa: E402


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def check_case(case, *, use_torch: bool, fd_mode: str):
    """All checks of one case: a dict of column -> GradCheck (or None for n/a)."""
    manual, autodiff = case.fn(jbp), case.fn(jbp.autodiff)
    results = {}
    for dtype in (jnp.float32, jnp.float64):
        args = case.args(dtype)
        results[f"autodiff {jnp.dtype(dtype).name}"] = gradcheck.versus_autodiff(
            manual, autodiff, args, names=case.names)
    args64 = case.args(jnp.float64)
    results["finite diff"] = gradcheck.versus_finite_differences(
        manual, args64, names=case.names, mode=fd_mode)
    if use_torch and case.torch is not None:
        out, vjp = jax.vjp(manual, *args64)
        u = gradcheck.random_cotangent(out)
        torch_out, torch_grads = torch_vjp(case, args64, u)
        rtol, atol = gradcheck.DEFAULT_TOLERANCES[("pytorch", "float64")]
        check = gradcheck.compare("manual", "pytorch", [out, *vjp(u)], [torch_out, *torch_grads],
                                  ["output", *case.names], rtol=rtol, atol=atol)
        results["pytorch"] = check
    else:
        results["pytorch"] = None
    return results


def cell(check) -> str:
    if check is None:
        return "n/a"
    return f"{check.max_abs:.1e}/{check.max_rel:.1e}" + ("" if check.ok else " FAIL")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer",
                        help="only cases of this layer, one of: " + ", ".join(jbp.LAYERS))
    parser.add_argument("--fd-mode", default="auto", choices=["auto", "full", "directions"],
                        help="finite differences: full Jacobian, random directions, or auto")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch oracle")
    parser.add_argument("--verbose", action="store_true", help="print per-argument tables")
    args = parser.parse_args(argv)

    cases = [c for c in CASES if args.layer in (None, c.layer)]
    if not cases:
        layers = sorted({c.layer for c in CASES})
        parser.error(f"no cases for layer {args.layer!r}; layers: {', '.join(layers)}")
    use_torch = not args.no_torch and torch_available()
    print(f"jbp gradient check: {len(cases)} cases, jax {jax.__version__} on "
          f"{jax.default_backend()}, PyTorch oracle "
          f"{'on' if use_torch else 'off (not installed)' if not args.no_torch else 'off'}")
    print("cells: max abs / max rel error of the manual gradients against each reference\n")

    columns = ["autodiff float32", "autodiff float64", "finite diff", "pytorch"]
    header = (f"{'layer':<29} {'config':<52} " + " ".join(f"{c:>17}" for c in columns)
              + "  result")
    print(header)
    print("-" * len(header))
    failures, worst = [], {c: 0.0 for c in columns}
    start = time.perf_counter()
    for case in cases:
        results = check_case(case, use_torch=use_torch, fd_mode=args.fd_mode)
        ok = all(r is None or r.ok for r in results.values())
        for c in columns:
            if results[c] is not None:
                worst[c] = max(worst[c], results[c].max_rel)
        print(f"{case.layer:<29} {case.config:<52} "
              + " ".join(f"{cell(results[c]):>17}" for c in columns)
              + f"  {'pass' if ok else 'FAIL'}", flush=True)
        if args.verbose or not ok:
            for r in results.values():
                if r is not None and (args.verbose or not r.ok):
                    print("\n".join("    " + line for line in str(r).splitlines()))
        if not ok:
            failures.append(case.id)

    print("-" * len(header))
    print("worst max rel error: " + ", ".join(f"{c} {worst[c]:.1e}" for c in columns))
    print(f"{len(cases) - len(failures)} passed, {len(failures)} failed "
          f"in {time.perf_counter() - start:.0f} s")
    if failures:
        print("failed: " + ", ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
