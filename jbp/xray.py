"""The X-ray: every layer call of a model's forward, measured rule by rule.

    report = jbp.xray.xray(model, params, state, x, y)        # rows + totals
    print(jbp.xray.markdown(report)); jbp.xray.plot(report, "xray.png")

How it works, in three passes over one real batch ``(x, y)`` (train mode):

1. **Find the calls.** The model's ``apply`` runs eagerly on an instrumented layer namespace
   (``apply(..., layers=<recorder>)``, a wrapper of the run's :class:`jbp.LayerPolicy`: every
   model takes its layers from the policy it receives), which records each call: layer name,
   arguments, output. A call is named by the parameters it receives (``blocks[3].conv1`` for
   the kernel at ``params["blocks"][3]["conv1"]["w"]``); a call without parameters by the last
   named call before it plus its own name (``blocks[3].bn1.relu``). The loss is the last row.
2. **Cotangents.** The forward runs again under ``jax.grad`` with a zero probe ``e_k`` added to
   every call's output; ``∂L/∂e_k = δ_k`` is the cotangent that call receives in the full model.
3. **Each call alone.** With its recorded inputs, ``jax.vjp`` of the call through jbp's rule and
   through ``jbp.autodiff`` (same forward, JAX's derivative) gives, for both: the residuals kept
   for the backward (the leaves of the VJP closure: for jbp, what the rule's ``fwd`` returns;
   counted once per distinct array, inputs included, since they must stay alive), the
   gradients for ``δ_k`` (``‖∂L/∂W‖``, ``‖∂L/∂a‖`` and the manual-vs-autodiff error), and the
   forward and backward time, each ``jax.jit``-compiled on these shapes, median of ``repeats``.
   The backward computes what a training step computes: the parameters' gradients, and
   ``∂L/∂a`` only where the call's input depends on the parameters. A call on the model's input
   batch itself (LeNet's and ResNet's first convolution) gets no ``∂L/∂a``: no step computes the
   gradient of the images (JAX drops it), and timing it made the stem's backward look 2-4x
   slower than the step's (docs/xray.md, "Reading the backward column"). Which inputs depend on
   the parameters is found by one more eager pass under ``jax.vjp`` in the parameters
   (:func:`_input_depends_on_params`).

Residual bytes are those of the linearisation before XLA optimises the compiled program (XLA may
fuse or rematerialise some); FLOPs are ``2·MACs`` for convolutions and dense layers (forward
``z``; backward ``∂L/∂a`` and ``∂L/∂W``, plus the bias sums) and XLA's own count for the rest.
``grad_rel_err = max_g ‖g_manual − g_autodiff‖_∞ / ‖g_autodiff‖_∞`` over the call's gradients.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import jax
import numpy as np

from jbp.policy import LayerPolicy

_NAMED = ("w", "b", "gamma", "beta")


class Call(NamedTuple):
    """One recorded layer call."""

    path: str
    layer: str
    args: tuple
    kwargs: dict
    diff: tuple          # positions of the arguments differentiated: the input (0) where it
                         # depends on the parameters, then the parameters
    params: int          # parameter count (elements) of the call's parameter arguments
    out_shape: tuple


class Report(NamedTuple):
    rows: List[Dict[str, Any]]
    totals: Dict[str, Any]


def _path_of(key_path) -> str:
    out = ""
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            out += f".{k.key}"
        elif isinstance(k, jax.tree_util.SequenceKey):
            out += f"[{k.idx}]"
        else:
            out += f".{k}"
    return out.lstrip(".")


def _owners(params) -> Dict[int, str]:
    """id(leaf) -> path of the layer that owns it (the leaf's path minus its own name)."""
    owners = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = _path_of(key_path)
        last = path.rsplit(".", 1)
        owners[id(leaf)] = last[0] if len(last) == 2 and last[1] in _NAMED else path
    return owners


def _primary(out):
    """The differentiated output of a layer: batch norm's ``y`` of ``(y, (mean, var))``."""
    return out[0] if isinstance(out, tuple) else out


class _Recorder:
    """A layer namespace that records every call (``probes=None``) or adds ``probes[k]`` to the
    k-th call's output (the cotangent pass)."""

    def __init__(self, base, owners=None, probes=None, depends=None):
        self._base, self._owners, self._probes = base, owners or {}, probes
        self._depends = depends          # a list: collects, per call, "input is a tracer"
        self.calls: List[Call] = []
        self._count = 0
        self._last = ""
        self._seen: Dict[str, int] = {}

    def __getattr__(self, name):
        fn = getattr(self._base, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            k, self._count = self._count, self._count + 1
            if self._probes is not None:
                y = _primary(out) + self._probes[k]
                return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
            if self._depends is not None:
                self._depends.append(any(isinstance(a, jax.core.Tracer)
                                         for a in jax.tree.leaves(args[0])))
                return out
            self._record(name, args, kwargs, out)
            return out

        return call

    def _record(self, name, args, kwargs, out):
        owned = [(i, self._owners[id(a)]) for i, a in enumerate(args)
                 if i > 0 and id(a) in self._owners]
        params = [i for i, _ in owned]
        if owned:
            path = self._last = owned[0][1]
        else:
            path = f"{self._last}.{name}" if self._last else name
        n = self._seen[path] = self._seen.get(path, 0) + 1
        path = path if n == 1 else f"{path}#{n}"
        size = int(sum(np.size(args[i]) for i in params))
        self.calls.append(Call(path, name, args, kwargs, (0, *params), size,
                               tuple(np.shape(_primary(out)))))


def _input_depends_on_params(apply: Callable, params, state, x, y, *, loss: str, nn
                             ) -> List[bool]:
    """Per call (in the order of :func:`record`): whether its input depends on the parameters,
    i.e. whether a training step computes ``∂L/∂a`` for it. The forward runs eagerly under
    ``jax.vjp`` in ``params``: exactly the values computed from the parameters are tracers;
    the model's input batch and what is computed from it alone stay concrete arrays."""
    depends: List[bool] = []

    def objective(p):
        rec = _Recorder(nn, depends=depends)
        logits, _ = apply(p, state, x, train=True, layers=rec)
        return getattr(rec, loss)(logits, y)

    jax.vjp(objective, params)
    return depends


def record(apply: Callable, params, state, x, y, *, loss: str = "softmax_cross_entropy",
           nn=None) -> List[Call]:
    """Pass 1: the model's layer calls (eager, train mode) and the loss call. A call whose input
    does not depend on the parameters (the model's input batch) differentiates its parameters
    only (``Call.diff`` without 0), as a training step does."""
    nn = nn or LayerPolicy("manual")
    rec = _Recorder(nn, _owners(params))
    logits, _ = apply(params, state, x, train=True, layers=rec)
    getattr(rec, loss)(logits, y)
    rec.calls[-1] = rec.calls[-1]._replace(path="loss")
    depends = _input_depends_on_params(apply, params, state, x, y, loss=loss, nn=nn)
    if len(depends) != len(rec.calls):
        raise RuntimeError(f"the model made {len(rec.calls)} layer calls, then "
                           f"{len(depends)}: jbp.xray needs a deterministic forward")
    return [c if dep or len(c.diff) == 1 else c._replace(diff=c.diff[1:])
            for c, dep in zip(rec.calls, depends)]


def cotangents(apply: Callable, params, state, x, y, calls: List[Call], *,
               loss: str = "softmax_cross_entropy", nn=None) -> List[jax.Array]:
    """Pass 2: ``δ_k = ∂L/∂(output of call k)`` in the full model, by zero probes."""
    probes = [np.zeros(c.out_shape, np.result_type(jax.tree.leaves(c.args[0])[0].dtype))
              for c in calls]                  # (concat's input is a list of arrays)
    probes[-1] = np.zeros((), np.float32)

    def objective(probes):
        rec = _Recorder(nn or LayerPolicy("manual"), probes=probes)
        logits, _ = apply(params, state, x, train=True, layers=rec)
        return getattr(rec, loss)(logits, y)

    return jax.jit(jax.grad(objective))(probes)


def _layer_fn(nn, call: Call) -> Callable:
    fn = getattr(nn, call.layer)

    def layer(*diff):
        args = list(call.args)
        for pos, v in zip(call.diff, diff):
            args[pos] = v
        return _primary(fn(*args, **call.kwargs))

    return layer


def _median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))                  # warm-up (compiled already)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _xla_flops(compiled) -> Optional[float]:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0))
    except Exception:  # noqa: BLE001 (some backends have no cost model)
        return None


def flops(call: Call):
    """(forward, backward) FLOPs of a convolution or dense call as 2·MACs; None otherwise.

    conv: forward ``2·N·H_out·W_out·C_out·KH·KW·C_in/G`` (+ ``N·H_out·W_out·C_out`` for the
    bias); backward twice the products (``∂L/∂a`` and ``∂L/∂W`` are one such sum each) plus the
    bias sum. dense: forward ``2·N·D_in·D_out`` (+ ``N·D_out``), backward ``4·N·D_in·D_out``
    (+ ``N·D_out``). A call on the model's input (no ``∂L/∂a``, ``0 not in call.diff``): the
    backward is the ``∂L/∂W`` sum alone, ``2·MACs`` (+ the bias sum)."""
    bias = len(call.args) > 2 and call.args[2] is not None
    if call.layer == "conv2d":
        kh, kw, cin_g, cout = np.shape(call.args[1])
        out = int(np.prod(call.out_shape))
        macs = out * kh * kw * cin_g
    elif call.layer == "conv_transpose2d":            # every input cell · every tap · C_out/G
        kh, kw, _, cout_g = np.shape(call.args[1])
        out = int(np.prod(call.out_shape))
        macs = int(np.size(call.args[0])) * kh * kw * cout_g
    elif call.layer == "dense":
        d_in, d_out = np.shape(call.args[1])
        out = int(np.prod(call.out_shape))
        macs = out * d_in
    else:
        return None
    sums = 2 if 0 in call.diff else 1                 # ∂L/∂W, and ∂L/∂a where it is needed
    return 2 * macs + bias * out, 2 * sums * macs + bias * out


def _measure(nn, call: Call, delta, repeats: int) -> Dict[str, Any]:
    f = _layer_fn(nn, call)
    diff = tuple(call.args[i] for i in call.diff)
    # Under jit, so that the residuals are what the linearised program returns (fast, too); a
    # residual that is an input comes back as its own buffer and is counted like the others.
    vjp = jax.jit(lambda *d: jax.vjp(f, *d)[1])(*diff)
    grads = jax.jit(lambda fn, g: fn(g))(vjp, delta)
    leaves = jax.tree.leaves(vjp)
    out = {"grads": grads, "residual_bytes": int(sum(v.nbytes for v in leaves)),
           "fwd_ms": None, "bwd_ms": None, "xla_flops": (None, None)}
    if repeats:
        fwd = jax.jit(f).lower(*diff).compile()
        bwd = jax.jit(lambda fn, g: fn(g)).lower(vjp, delta).compile()  # the backward alone
        out.update(fwd_ms=_median_ms(fwd, *diff, repeats=repeats),
                   bwd_ms=_median_ms(bwd, vjp, delta, repeats=repeats),
                   xla_flops=(_xla_flops(fwd), _xla_flops(bwd)))
    return out


def _rel_err(got, want) -> float:
    errs = []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        errs.append(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30)))
    return max(errs)


def _in_shape(x) -> list:
    """The input's shape; a list of shapes for a list of inputs (concat)."""
    if isinstance(x, (list, tuple)):
        return [list(np.shape(a)) for a in x]
    return list(np.shape(x))


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _norm(arrays) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64)))
                             for a in jax.tree.leaves(arrays))))


def xray(apply: Callable, params, state, x, y, *, repeats: int = 5,
         loss: str = "softmax_cross_entropy", manual=None,
         progress: Optional[Callable[[str], None]] = None) -> Report:
    """X-ray of ``apply`` (a model's apply function) on the batch ``(x, y)``.

    ``manual`` is the :class:`jbp.LayerPolicy` whose rules are measured (default
    ``LayerPolicy("manual")``; pass ``LayerPolicy("manual", residuals="int8")`` to see a residual
    policy); the reference is always ``jbp.autodiff``. ``repeats=0`` skips the timing (and
    XLA's FLOP counts): the ``*_ms`` fields are then None. Returns a :class:`Report`: one dict
    per call (keys in :data:`COLUMNS`) and the totals.
    """
    manual = manual or LayerPolicy("manual")
    auto = LayerPolicy("autodiff")
    calls = record(apply, params, state, x, y, loss=loss, nn=manual)
    deltas = cotangents(apply, params, state, x, y, calls, loss=loss, nn=manual)
    rows = []
    for call, delta in zip(calls, deltas):
        if progress:
            progress(call.path)
        m = _measure(manual, call, delta, repeats)
        a = _measure(auto, call, delta, repeats)
        counted = flops(call)
        f_fwd, f_bwd = counted if counted else m["xla_flops"]
        n_in = 1 if call.diff[0] == 0 else 0          # is ∂L/∂a among the gradients?
        rows.append({
            "path": call.path, "layer": call.layer,
            "in_shape": _in_shape(call.args[0]), "out_shape": list(call.out_shape),
            "params": call.params, "flops_fwd": f_fwd, "flops_bwd": f_bwd,
            "residual_bytes": m["residual_bytes"], "autodiff_residual_bytes": a["residual_bytes"],
            "fwd_ms": m["fwd_ms"], "bwd_ms": m["bwd_ms"],
            "autodiff_fwd_ms": a["fwd_ms"], "autodiff_bwd_ms": a["bwd_ms"],
            "bwd_fwd_ratio": _ratio(m["bwd_ms"], m["fwd_ms"]),
            "autodiff_bwd_fwd_ratio": _ratio(a["bwd_ms"], a["fwd_ms"]),
            "grad_norm_w": _norm(m["grads"][n_in:]) if len(call.diff) > n_in else None,
            "grad_norm_a": _norm(m["grads"][:1]) if n_in else None,
            "input_grad": bool(n_in),
            "grad_rel_err": _rel_err(m["grads"], a["grads"]),
        })
    return Report(rows, _totals(rows))


COLUMNS = ("path", "layer", "in_shape", "out_shape", "params", "flops_fwd", "flops_bwd",
           "residual_bytes", "autodiff_residual_bytes", "fwd_ms", "bwd_ms", "autodiff_fwd_ms",
           "autodiff_bwd_ms", "bwd_fwd_ratio", "autodiff_bwd_fwd_ratio", "grad_norm_w",
           "grad_norm_a", "grad_rel_err", "input_grad")


def _totals(rows) -> Dict[str, Any]:
    keys = ("params", "flops_fwd", "flops_bwd", "residual_bytes", "autodiff_residual_bytes",
            "fwd_ms", "bwd_ms", "autodiff_fwd_ms", "autodiff_bwd_ms")
    t = {k: sum(r[k] or 0 for r in rows) for k in keys}
    timed = rows[0]["fwd_ms"] is not None
    t["bwd_fwd_ratio"] = t["bwd_ms"] / t["fwd_ms"] if timed else None
    t["autodiff_bwd_fwd_ratio"] = (t["autodiff_bwd_ms"] / t["autodiff_fwd_ms"] if timed
                                   else None)
    t["grad_rel_err"] = max(r["grad_rel_err"] for r in rows)
    t["calls"] = len(rows)
    return t


def _fmt(v, kind=""):
    if v is None:
        return "–"
    if kind == "bytes":
        return f"{v / 1024:.1f}K" if v < 2 ** 20 else f"{v / 2 ** 20:.2f}M"
    if kind == "flops":
        return f"{v / 1e6:.2f}M" if v < 1e9 else f"{v / 1e9:.2f}G"
    if isinstance(v, float):
        return f"{v:.2e}" if (abs(v) < 1e-2 and v) else f"{v:.2f}"
    return str(v)


def markdown(report: Report) -> str:
    """The report as a markdown table (one row per call, then the totals)."""
    head = ("| path | layer | in → out | params | MFLOPs fwd/bwd | residuals jbp / autodiff | "
            "fwd ms jbp / ad | bwd ms jbp / ad | bwd/fwd jbp / ad | ‖∂L/∂W‖ | ‖∂L/∂a‖ | "
            "rel err |\n|" + "---|" * 12)
    lines = [head]
    for r in report.rows + [dict(report.totals, path="**total**", layer="", in_shape="",
                                 out_shape="", grad_norm_w=None, grad_norm_a=None)]:
        shapes = (f"{tuple(r['in_shape'])} → {tuple(r['out_shape'])}" if r["in_shape"] != ""
                  else f"{r['calls']} calls")
        lines.append(
            f"| {r['path']} | {r['layer']} | {shapes} | {r['params']} | "
            f"{_fmt(r['flops_fwd'], 'flops')} / {_fmt(r['flops_bwd'], 'flops')} | "
            f"{_fmt(r['residual_bytes'], 'bytes')} / {_fmt(r['autodiff_residual_bytes'], 'bytes')}"
            f" | {_fmt(r['fwd_ms'])} / {_fmt(r['autodiff_fwd_ms'])} | {_fmt(r['bwd_ms'])} / "
            f"{_fmt(r['autodiff_bwd_ms'])} | {_fmt(r['bwd_fwd_ratio'])} / "
            f"{_fmt(r['autodiff_bwd_fwd_ratio'])} | {_fmt(r['grad_norm_w'])} | "
            f"{_fmt(r['grad_norm_a'])} | {_fmt(r['grad_rel_err'])} |")
    return "\n".join(lines)


def plot(report: Report, path: str, title: str = "") -> Optional[str]:
    """Three panels over the calls: time (fwd/bwd, jbp vs autodiff), residual bytes (jbp vs
    autodiff), gradient norms (log scale). Returns the path, or None without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    rows = report.rows
    i = np.arange(len(rows))
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.16 * len(rows) + 3), 8), sharex=True)
    ax = axes[0]
    for key, label, off, col in (("fwd_ms", "fwd jbp", -0.3, "#1f77b4"),
                                 ("autodiff_fwd_ms", "fwd autodiff", -0.1, "#aec7e8"),
                                 ("bwd_ms", "bwd jbp", 0.1, "#d62728"),
                                 ("autodiff_bwd_ms", "bwd autodiff", 0.3, "#ff9896")):
        ax.bar(i + off, [r[key] or 0.0 for r in rows], 0.2, label=label, color=col)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.legend(fontsize=7, ncol=4)
    ax = axes[1]
    ax.bar(i - 0.2, [r["residual_bytes"] / 2 ** 10 for r in rows], 0.4, label="jbp rule")
    ax.bar(i + 0.2, [r["autodiff_residual_bytes"] / 2 ** 10 for r in rows], 0.4,
           label="JAX autodiff")
    ax.set_yscale("log")
    ax.set_ylabel("residuals (KiB)")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.semilogy(i, [r["grad_norm_a"] or np.nan for r in rows], "o-", ms=3, label="‖∂L/∂a‖")
    ax.semilogy(i, [r["grad_norm_w"] or np.nan for r in rows], "s", ms=4, label="‖∂L/∂W‖")
    ax.set_ylabel("gradient norm")
    ax.legend(fontsize=7)
    ax.set_xticks(i)
    ax.set_xticklabels([r["path"] for r in rows], rotation=90, fontsize=6)
    fig.suptitle(title or "jbp X-ray", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path
