"""Is a float32 gradient as accurate as JAX's autodiff? Both judged against float64.

Two float32 computations of one gradient, jbp's hand-written rules and JAX's derivative of the
same forward (``jbp.autodiff``), sum in different orders (another convolution algorithm, batch
norm's closed-form backward), so they differ from each other by float32 rounding, amplified
wherever the gradient cancels (batch norm at initialisation: up to 1e-2 relative on a leaf).
How far apart two correct float32 gradients may be depends on the CPU and the algorithm, so
their difference says nothing on its own. What does: each one's distance from the **float64
gradient of the same computation**. Per leaf ``ℓ`` with reference ``r``::

    e(g) = max |g − r| / max |r|                                      (the gradcheck measure)
    ok   ⇔ e(manual) <= FACTOR · e(autodiff) + ULPS · ε₃₂     (FACTOR 8, ULPS 16, ε₃₂ = 2⁻²³)

that is, the manual gradient is as accurate as autodiff's, up to a small factor (another
summation order may round somewhat worse) and a floor of a few ulps where autodiff happens to be
exact; docs/precision.md has the measurements behind both numbers. A rule wrong by more than
rounding can explain (a weight gradient scaled by 1 + 1e-3, one kernel tap dropped) fails:
``tests/test_accuracy.py``.

**The same side of every kink.** A float32 forward and a float64 forward can land on different
sides of a ReLU (an input within rounding of 0) or pick another winner in a max pool (two inputs
within rounding of each other). The two gradients then differ by a whole δ entry, not by
rounding, and in a ResNet such a switch somewhere in the batch is common. So the reference of
each float32 run is the float64 gradient *on the branches that run took*: :func:`gradients` records
every ``relu`` mask and ``max_pool`` argmax of the float32 forward, and :func:`reference`
replays them in float64 (``relu(x) = 1[recorded] ⊙ x``, ``max_pool(x) = x[recorded index]``),
so both sides differentiate the same piecewise-smooth branch. Other kinked layers (leaky ReLU,
adaptive max pool, hinge-like losses) are not pinned; the models of ``jbp.models`` use none.

``scripts/compare.py`` prints this table for a model's step-0 gradient (and exits 1 on FAIL);
``jbp.gradcheck.versus_autodiff`` judges float32 layers this way (one layer's inputs are exact
in both dtypes, so nothing needs pinning there); docs/precision.md shows the measured errors.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jbp.policy import LayerPolicy

#: How many times autodiff's own float32 error a manual leaf may have.
FACTOR = 8.0
#: The floor, in float32 ulps (ε₃₂ = 2⁻²³) relative to the leaf's largest entry.
ULPS = 16
EPS32 = 2.0 ** -23


@dataclass(frozen=True)
class LeafAccuracy:
    """One leaf: the errors of the two float32 gradients against float64, and the verdict."""

    name: str
    error: float             # e(manual) = max |g − r| / max |r|
    autodiff_error: float    # e(autodiff), each against its own float64 reference
    bound: float             # FACTOR · e(autodiff) + ULPS · ε₃₂
    ok: bool


@dataclass(frozen=True)
class Float32Check:
    """The float32 verdict over all leaves (``str`` is a table)."""

    label: str
    rows: Tuple[LeafAccuracy, ...]
    factor: float
    ulps: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def worst(self) -> LeafAccuracy:
        """The leaf closest to (or furthest past) its bound."""
        return max(self.rows, key=lambda r: r.error / r.bound if r.bound > 0 else math.inf)

    def __str__(self) -> str:
        title = f"{self.label} vs float64, beside autodiff vs float64"
        if self.detail:
            title += f" ({self.detail})"
        w = max([8] + [len(r.name) for r in self.rows])
        lines = [title, f"  {'leaf':<{w}} {'manual err':>10} {'autodiff err':>12} {'bound':>10}"
                        f"  result",
                 f"  {'-' * w} {'-' * 10} {'-' * 12} {'-' * 10}  ------"]
        for r in self.rows:
            lines.append(f"  {r.name:<{w}} {r.error:>10.2e} {r.autodiff_error:>12.2e} "
                         f"{r.bound:>10.2e}  {'ok' if r.ok else 'FAIL'}")
        worst = self.worst
        lines.append(f"  verdict: manual err <= {self.factor:g} x autodiff err + {self.ulps:g} "
                     f"ulps per leaf; worst {worst.name} at {worst.error / worst.bound:.2f} of "
                     f"its bound: {'ok' if self.ok else 'FAIL'}")
        return "\n".join(lines)


def relative_error(got, reference) -> float:
    """``max |got − reference| / max |reference|`` in float64 (0 for two empty or zero leaves)."""
    a = np.asarray(got, np.float64).ravel()
    r = np.asarray(reference, np.float64).ravel()
    if a.shape != r.shape:
        raise ValueError(f"gradient has {a.size} entries, its reference {r.size}")
    if a.size == 0:
        return 0.0
    if not np.all(np.isfinite(a)):
        return math.inf
    diff, scale = float(np.max(np.abs(a - r))), float(np.max(np.abs(r)))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def judge(got, autodiff, reference, names: Sequence[str], *, autodiff_reference=None,
          factor: float = FACTOR, ulps: float = ULPS, label: str = "manual",
          detail: str = "") -> Float32Check:
    """The verdict on the float32 leaves ``got`` (lists of arrays, one per name).

    ``reference`` is ``got``'s float64 reference; ``autodiff_reference`` is ``autodiff``'s where
    the two runs took different branches (default: the same reference).
    """
    autodiff_reference = reference if autodiff_reference is None else autodiff_reference
    columns = (got, autodiff, reference, autodiff_reference)
    if not names or len({len(names), *map(len, columns)}) != 1:
        raise ValueError(f"judge: {len(names)} names for {[len(c) for c in columns]} leaves")
    rows = []
    for name, g, a, r, ra in zip(names, *columns):
        error, autodiff_error = relative_error(g, r), relative_error(a, ra)
        bound = factor * autodiff_error + ulps * EPS32
        # A non-finite autodiff gradient would make any bound infinite: nothing is judged then.
        ok = math.isfinite(error) and math.isfinite(autodiff_error) and error <= bound
        rows.append(LeafAccuracy(name, error, autodiff_error, bound, bool(ok)))
    return Float32Check(label, tuple(rows), factor, ulps, detail)


# --- a model's gradient on the same side of every kink ---------------------------------------

class _Kinks:
    """A layer namespace that records the branch of every ReLU and max pool (``replay=None``)
    or replays recorded branches (a list, in call order)."""

    def __init__(self, nn, replay: Optional[list] = None):
        self._nn, self._replay, self.branches = nn, replay, []

    def __getattr__(self, name):
        if name in ("relu", "max_pool"):
            return getattr(self, "_" + name)
        return getattr(self._nn, name)

    def _next(self):
        if self._replay is None:
            return None
        k = len(self.branches)
        if k >= len(self._replay):
            raise ValueError(f"the reference forward reached kink {k + 1}, the recorded run "
                             f"had {len(self._replay)}: not the same model")
        self.branches.append(self._replay[k])
        return self._replay[k]

    def _relu(self, x, **kwargs):
        mask = self._next()
        if mask is None:
            self.branches.append(x > 0)
            return self._nn.relu(x, **kwargs)
        return jnp.where(mask, x, jnp.zeros((), x.dtype))          # ∂/∂x = 1[recorded]

    def _max_pool(self, x, *args, return_indices: bool = False, **kwargs):
        index = self._next()
        if index is None:
            y, index = self._nn.max_pool(x, *args, return_indices=True, **kwargs)
            self.branches.append(index)
        else:   # the recorded winner: PyTorch's row-major index h·W + w of each window's max
            n, h, w, c = x.shape
            flat = jnp.take_along_axis(x.reshape(n, h * w, c),
                                       index.reshape(n, -1, c).astype(jnp.int32), axis=1)
            y = flat.reshape(index.shape)
        return (y, index) if return_indices else y


def gradients(apply: Callable, params, state, x, y, *, grad: str = "manual",
              loss: str = "softmax_cross_entropy"):
    """One float32 train-mode gradient: ``(loss, grads, branches)``, ``branches`` being every
    ReLU mask and max-pool index of its forward (for :func:`reference`). ``grad``:
    ``"manual"`` or ``"autodiff"``."""
    layers = LayerPolicy(grad)

    def run(params, state, x, y):
        def objective(params):
            nn = _Kinks(layers)
            logits, _ = apply(params, state, x, train=True, layers=nn)
            return getattr(nn, loss)(logits, y), nn.branches
        (value, branches), g = jax.value_and_grad(objective, has_aux=True)(params)
        return value, g, branches

    return jax.jit(run)(params, state, x, y)


def widen(tree):
    """Every floating array of ``tree`` in float64 (exact: float32 values widen without
    rounding); integer arrays as they are. Call under ``jax.enable_x64(True)``."""
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)
                        if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


@functools.lru_cache(maxsize=None)
def _reference_fn(apply: Callable, loss: str):
    """The jitted float64 gradient on replayed branches, one per model and loss: the branches
    are arguments, so the manual and autodiff references share one compiled program."""
    def grad64(params, state, x, y, branches):
        def objective(params):
            nn = _Kinks(LayerPolicy("autodiff"), replay=branches)
            logits, _ = apply(params, state, x, train=True, layers=nn)
            if len(nn.branches) != len(branches):
                raise ValueError(f"the reference forward took {len(nn.branches)} kinks, the "
                                 f"recorded run {len(branches)}: not the same model")
            return getattr(nn, loss)(logits, y)
        return jax.grad(objective)(params)

    return jax.jit(grad64)


def reference(apply: Callable, params, state, x, y, branches: List, *,
              loss: str = "softmax_cross_entropy"):
    """The float64 gradient (JAX's derivative of ``jbp.autodiff``'s forward) on ``branches``,
    the kinks a float32 run of :func:`gradients` took. Float64 is enabled for this call only."""
    with jax.enable_x64(True):
        params64, state64, x64 = widen((params, state, x))
        return _reference_fn(apply, loss)(params64, state64, x64, y, list(branches))


class Side(NamedTuple):
    """One float32 run of a model's training loss and its float64 reference."""

    loss: Any          # the float32 loss value
    grads: Any         # its float32 gradient (the params pytree)
    reference: Any     # the float64 gradient on the branches this run took


def side(apply: Callable, params, state, x, y, *, grad: str,
         loss: str = "softmax_cross_entropy") -> Side:
    """One float32 gradient (``grad="manual"`` or ``"autodiff"``) and its float64 reference on
    its own branches."""
    value, grads, branches = gradients(apply, params, state, x, y, grad=grad, loss=loss)
    return Side(value, grads, reference(apply, params, state, x, y, branches, loss=loss))


def check_model(apply: Callable, params, state, x, y, *, loss: str = "softmax_cross_entropy",
                factor: float = FACTOR, ulps: float = ULPS, detail: str = "", autodiff=None):
    """jbp's float32 gradient of a model's training loss against autodiff's, both against
    float64 on their own branches: ``(Float32Check, manual Side, autodiff Side)``.

    ``apply`` is a ``jbp.models`` apply (it takes ``layers=``, a layer policy). Not for models
    wrapped in ``jax.checkpoint`` (``model.remat``: the recorded branches would leave the
    checkpoint) nor with random layers (dropout draws other numbers in float64). ``autodiff``:
    a :func:`side` of ``grad="autodiff"`` computed before (it does not depend on the
    convolution backend, which only the hand-written rules consult)."""
    from jbp.train import leaf_names  # noqa: PLC0415
    manual = side(apply, params, state, x, y, grad="manual", loss=loss)
    autodiff = autodiff or side(apply, params, state, x, y, grad="autodiff", loss=loss)
    check = judge(jax.tree.leaves(manual.grads), jax.tree.leaves(autodiff.grads),
                  jax.tree.leaves(manual.reference), leaf_names(manual.grads),
                  autodiff_reference=jax.tree.leaves(autodiff.reference), factor=factor,
                  ulps=ulps, detail=detail)
    return check, manual, autodiff
