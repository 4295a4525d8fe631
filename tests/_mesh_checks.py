"""Checks that need eight host devices, run by tests/test_data_parallel.py in a subprocess.

XLA's host device count is fixed when jax is imported, and every test module shares one pytest
process, so this script sets ``XLA_FLAGS`` itself, runs every check once and prints one JSON
object (the last line of stdout) that the tests read. Run it by hand to see the numbers:

    PYTHONPATH=$PWD python tests/_mesh_checks.py [--timing]

References are independent of the code under test's sharding: the same layer (or train step)
called once on the whole global batch on one device, float64.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import jbp  # noqa: E402
import jbp.autodiff  # noqa: E402
from jbp.models import get_model  # noqa: E402
from jbp.train import init_train_state, make_optimizer, make_train_step  # noqa: E402

N = 16                      # global batch: 2 per device
MESH = Mesh(np.array(jax.devices()), ("data",))
COLLECTIVES = ("all-reduce", "collective-permute", "all-to-all", "all-gather",
               "reduce-scatter")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b))), 1e-300) if b.size else 1.0
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def _max_rel(tree_a, tree_b) -> float:
    la, lb = jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)
    assert len(la) == len(lb)
    return max([_rel(a, b) for a, b in zip(la, lb)] or [0.0])


# --- every layer family under shard_map vs the global-batch call ----------------------------

def _layer_cases(ns):
    """(name, f(xs, ps, axis) -> (output, forward-only extras), x shapes, param shapes, is_loss).

    ``axis`` is ``"data"`` under shard_map and None for the global-batch call; only batch norm
    reads it (synchronised statistics).
    """
    stats = (jnp.zeros(3, jnp.float64), jnp.ones(3, jnp.float64))

    def plain(fn):
        return lambda xs, ps, axis: (fn(xs, ps), ())

    def bn_train(xs, ps, axis):
        return ns.batch_norm(xs[0], ps[0], ps[1], *stats, train=True, axis_name=axis)

    def bn_eval(xs, ps, axis):
        return ns.batch_norm(xs[0], ps[0], ps[1], *stats, train=False)[0], ()

    return [
        ("conv2d[3x3 SAME bias]", plain(lambda xs, ps: ns.conv2d(xs[0], ps[0], ps[1])),
         [(N, 6, 6, 3)], [(3, 3, 3, 4), (4,)], False),
        ("conv2d[3x3 stride2 VALID]", plain(lambda xs, ps: ns.conv2d(
            xs[0], ps[0], stride=2, padding="VALID")), [(N, 7, 7, 2)], [(3, 3, 2, 5)], False),
        ("conv2d[3x3 64ch 4x4]", plain(lambda xs, ps: ns.conv2d(xs[0], ps[0], padding=1)),
         [(N, 4, 4, 64)], [(3, 3, 64, 64)], False),
        ("conv2d[depthwise]", plain(lambda xs, ps: ns.conv2d(xs[0], ps[0], groups=4)),
         [(N, 5, 5, 4)], [(3, 3, 1, 4)], False),
        ("dense", plain(lambda xs, ps: ns.dense(xs[0], ps[0], ps[1])),
         [(N, 7)], [(7, 3), (3,)], False),
        ("flatten", plain(lambda xs, ps: ns.flatten(xs[0])), [(N, 2, 3, 2)], [], False),
        ("relu", plain(lambda xs, ps: ns.relu(xs[0])), [(N, 5)], [], False),
        ("leaky_relu", plain(lambda xs, ps: ns.leaky_relu(xs[0], 0.1)), [(N, 5)], [], False),
        ("sigmoid", plain(lambda xs, ps: ns.sigmoid(xs[0])), [(N, 5)], [], False),
        ("tanh", plain(lambda xs, ps: ns.tanh(xs[0])), [(N, 5)], [], False),
        ("softmax", plain(lambda xs, ps: ns.softmax(xs[0])), [(N, 5)], [], False),
        ("log_softmax", plain(lambda xs, ps: ns.log_softmax(xs[0])), [(N, 5)], [], False),
        ("silu", plain(lambda xs, ps: ns.silu(xs[0])), [(N, 5)], [], False),
        ("relu6", plain(lambda xs, ps: ns.relu6(xs[0] * 4)), [(N, 5)], [], False),
        ("hard_swish", plain(lambda xs, ps: ns.hard_swish(xs[0] * 3)), [(N, 5)], [], False),
        ("channel_scale", plain(lambda xs, ps: ns.channel_scale(xs[0], xs[1])),
         [(N, 3, 3, 4), (N, 4)], [], False),
        ("max_pool", plain(lambda xs, ps: ns.max_pool(xs[0], 2)), [(N, 6, 6, 3)], [], False),
        ("avg_pool[SAME]", plain(lambda xs, ps: ns.avg_pool(xs[0], 3, 2, "SAME")),
         [(N, 6, 6, 3)], [], False),
        ("global_avg_pool", plain(lambda xs, ps: ns.global_avg_pool(xs[0])),
         [(N, 4, 4, 3)], [], False),
        ("batch_norm[train, sync]", bn_train, [(N, 5, 4, 3)], [(3,), (3,)], False),
        # Negative control: per-device statistics must NOT match the global batch's.
        ("batch_norm[train, unsynced]", lambda xs, ps, axis: (bn_train(xs, ps, None)[0], ()),
         [(N, 5, 4, 3)], [(3,), (3,)], False),
        ("batch_norm[eval]", bn_eval, [(N, 5, 4, 3)], [(3,), (3,)], False),
        ("softmax_cross_entropy", plain(lambda xs, ps: ns.softmax_cross_entropy(
            xs[0], jnp.argmax(xs[1], -1))), [(N, 5), (N, 5)], [], True),
        ("mse", plain(lambda xs, ps: ns.mse(xs[0], xs[1])), [(N, 3), (N, 3)], [], True),
        # Segmentation's layers (issue 26); the Dice loss's sums span the batch: not here.
        ("conv_transpose2d", plain(lambda xs, ps: ns.conv_transpose2d(
            xs[0], ps[0], ps[1], stride=2)), [(N, 3, 3, 4)], [(2, 2, 4, 3), (3,)], False),
        ("upsample[bilinear]", plain(lambda xs, ps: ns.upsample(xs[0], scale=2,
                                                                mode="bilinear")),
         [(N, 3, 4, 2)], [], False),
        ("concat+pad[constant]", plain(lambda xs, ps: ns.pad(ns.concat([xs[0], xs[1]]),
                                                             ((1, -1), (0, 1)), "constant")),
         [(N, 3, 3, 2), (N, 3, 3, 1)], [], False),
        ("softmax_cross_entropy[per pixel]", plain(lambda xs, ps: ns.softmax_cross_entropy(
            xs[0], jnp.argmax(xs[1], -1))), [(N, 2, 3, 4), (N, 2, 3, 4)], [], True),
        ("sigmoid_binary_cross_entropy", plain(lambda xs, ps: ns.sigmoid_binary_cross_entropy(
            xs[0], jnp.abs(jnp.sin(xs[1])))), [(N, 3), (N, 3)], [], True),
    ]


def check_layers() -> dict:
    """Forward outputs and gradients (inputs and parameters) of ``Σ out ⊙ c`` (a loss: itself,
    the global mean), under shard_map over 8 devices vs one call on the global batch. Every
    manual layer, and autodiff's batch norm (its ``axis_name``); all cases in one program so
    that the check compiles twice, not once per case."""
    rng = np.random.default_rng(0)
    cases = [("manual", c) for c in _layer_cases(jbp)]
    cases += [("autodiff", c) for c in _layer_cases(jbp.autodiff) if c[0].startswith("batch")]
    inputs = []
    for _, (name, f, xshapes, pshapes, is_loss) in cases:
        if name == "max_pool":                     # tie-free: distinct values
            xs = [jnp.asarray(rng.permutation(int(np.prod(s))).reshape(s) / 7.0)
                  for s in xshapes]
        else:
            xs = [jnp.asarray(rng.standard_normal(s)) for s in xshapes]
        ps = [jnp.asarray(rng.standard_normal(s)) for s in pshapes]
        out_shape = jax.eval_shape(lambda xs, ps: f(xs, ps, None)[0], xs, ps)
        inputs.append((xs, ps, jnp.asarray(rng.standard_normal(out_shape.shape))))

    def run_one(f, is_loss, xs, ps, c, axis):
        def objective(xs, ps):
            out = f(xs, ps, axis)[0]
            if is_loss:
                return out if axis is None else jax.lax.pmean(out, axis)
            total = jnp.sum(out * c)
            return total if axis is None else jax.lax.psum(total, axis)
        grads = jax.grad(objective, argnums=(0, 1))(xs, ps)
        out, extra = f(xs, ps, axis)
        if is_loss and axis is not None:
            out = jax.lax.pmean(out, axis)
        return out, extra, grads

    def run_all(inputs, axis):
        return [run_one(f, is_loss, xs, ps, c, axis)
                for (_, (_, f, _, _, is_loss)), (xs, ps, c) in zip(cases, inputs)]

    in_specs, out_specs = [], []
    for _, (_, _, xshapes, pshapes, is_loss) in cases:
        out_spec = P() if is_loss else P("data")
        in_specs.append(([P("data")] * len(xshapes), [P()] * len(pshapes), out_spec))
        out_specs.append((out_spec, P(), ([P("data")] * len(xshapes), [P()] * len(pshapes))))
    sharded = jax.jit(jax.shard_map(lambda inp: run_all(inp, "data"), mesh=MESH,
                                    in_specs=(in_specs,), out_specs=out_specs))
    got = sharded(inputs)
    want = jax.jit(lambda inp: run_all(inp, None))(inputs)
    return {f"{ns}:{c[0]}": _max_rel(g, w) for (ns, c), g, w in zip(cases, got, want)}


# --- train steps -----------------------------------------------------------------------------

def _state(model, opt):
    st = init_train_state(model, opt, jax.random.key(0), (28, 28, 1), 10)
    return jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, st)


def _count_collectives(text: str) -> dict:
    return {c: len(re.findall(rf"\s{c}(-start)?\(", text)) for c in COLLECTIVES}


def check_steps(models=("lenet5", "resnet20"), steps=3, timing=False) -> dict:
    out = {}
    opt = make_optimizer("momentum", 0.05)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((N, 28, 28, 1)))
    y = jnp.asarray(np.arange(N) % 10)
    for name in models:
        model = get_model(name)
        for grad in ("manual", "autodiff"):
            single = make_train_step(model.apply, opt, grad=grad, donate=False)
            sharded = make_train_step(model.apply, opt, grad=grad, donate=False, mesh=MESH)
            a = b = _state(model, opt)
            t0 = time.perf_counter()
            compiled = sharded.lower(b, x, y).compile()
            compile_s = time.perf_counter() - t0
            for _ in range(steps):
                a, _ = single(a, x, y)
                b, metrics = compiled(b, x, y)
            key = f"{name}:{grad}"
            out[key] = {"params": _max_rel(b.params, a.params),
                        "model_state": _max_rel(b.model_state, a.model_state),
                        "opt_state": _max_rel(b.opt_state, a.opt_state),
                        "replicated": all(leaf.sharding.is_fully_replicated
                                          for leaf in jax.tree.leaves(b.params)),
                        "collectives": _count_collectives(compiled.as_text()),
                        "compile_s": compile_s}
            if timing:
                jax.block_until_ready(compiled(b, x, y))
                t0 = time.perf_counter()
                for _ in range(5):
                    b, metrics = compiled(b, x, y)
                jax.block_until_ready(b)
                out[key]["step_s"] = (time.perf_counter() - t0) / 5
    return out


def check_errors() -> dict:
    model = get_model("lenet5")
    opt = make_optimizer("sgd", 0.1)
    st = _state(model, opt)
    step = make_train_step(model.apply, opt, mesh=MESH, donate=False)
    out = {}
    try:
        step(st, jnp.zeros((12, 28, 28, 1)), jnp.zeros((12,), jnp.int32))
        out["indivisible"] = "no error"
    except ValueError as err:
        out["indivisible"] = str(err)
    try:
        make_train_step(model.apply, opt, mesh=Mesh(np.array(jax.devices()), ("batch",)))
        out["no_data_axis"] = "no error"
    except ValueError as err:
        out["no_data_axis"] = str(err)
    # jax.make_mesh's default (Explicit axes) must work too.
    explicit = jax.make_mesh((8,), ("data",))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((N, 28, 28, 1)))
    y = jnp.asarray(np.arange(N) % 10)
    ref, _ = make_train_step(model.apply, opt, donate=False)(st, x, y)
    got, _ = make_train_step(model.apply, opt, donate=False, mesh=explicit)(st, x, y)
    out["explicit_mesh"] = _max_rel(got.params, ref.params)
    return out


def check_quantities() -> dict:
    """jbp.quantities.compute(mesh=) and the DP-SGD step with mesh= against the same calls on
    one device (tests/test_quantities.py's transposed/grouped-conv net with eval batch norm, and
    its MLP for DP, float64)."""
    import optax  # noqa: PLC0415
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_quantities as TQ  # noqa: PLC0415
    from jbp import quantities as Q  # noqa: PLC0415
    out = {}
    apply, (params, state), shape = TQ.family_net("general")
    x, y = TQ._data(jax.random.key(21), N, shape, 3)
    names = TQ.FIRST + ("diag_ggn", "kfac")
    one = Q.compute(apply, params, state, x, y, quantities=names)
    many = Q.compute(apply, params, state, x, y, quantities=names, mesh=MESH)
    for name in names + ("loss", "grad"):
        out[f"compute:{name}"] = _max_rel(many[name], one[name])
    out["batch_l2_sharded"] = str(many["batch_l2"]["ct"]["w"].sharding.spec)
    try:
        Q.compute(apply, params, state, x[:12], y[:12], quantities=("batch_l2",), mesh=MESH)
        out["indivisible"] = "no error"
    except ValueError as err:
        out["indivisible"] = str(err)
    mlp = TQ.mlp_init(jax.random.key(0))
    x, y = TQ._data(jax.random.key(1), N, (2, 2, 3), 4)
    norms = Q.compute(TQ.mlp_apply, mlp, {}, x, y, quantities=("batch_l2",), reduction="sum")
    clip = float(np.median(np.sqrt(sum(jax.tree.leaves(norms["batch_l2"])))))   # half clipped
    train_state = _state_for(mlp, optax.sgd(0.1))
    for noise in (1.0,):     # the noise drawn from the same key: equal on one and many devices
        ref_state, ref = make_train_step(TQ.mlp_apply, optax.sgd(0.1), dp=(clip, noise),
                                         donate=False)(train_state, x, y)
        got_state, got = make_train_step(TQ.mlp_apply, optax.sgd(0.1), dp=(clip, noise),
                                         donate=False, mesh=MESH)(train_state, x, y)
        def update(new):
            return jax.tree.map(lambda a, b: a - b, new.params, train_state.params)
        out[f"dp:{noise}:update"] = _max_rel(update(got_state), update(ref_state))
        out[f"dp:{noise}:norms"] = _rel(got["per_example_norms"], ref["per_example_norms"])
        out[f"dp:{noise}:clipped_fraction"] = [float(got["clipped_fraction"]),
                                               float(ref["clipped_fraction"])]
    return out


def _state_for(params, opt):
    from jbp.train import TrainState  # noqa: PLC0415
    return TrainState(params, {}, opt.init(params), jnp.zeros((), jnp.int32),
                      jax.random.key(3))


def main(argv) -> None:
    timing = "--timing" in argv
    result = {"devices": jax.device_count()}
    t0 = time.perf_counter()
    result["layers"] = check_layers()
    result["errors"] = check_errors()
    result["steps"] = check_steps(timing=timing)
    result["quantities"] = check_quantities()
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
