"""K-FAC's data-parallel step on 2 host devices against the one-device step on the same global
batch, float64 (run by tests/test_second_order.py in a subprocess: XLA's device count is fixed
when jax is imported). Prints one JSON line: the largest relative parameter difference after
each step, and, for the conv + batch-norm net, the elements all-reduced by each compiled program
(K-FAC's refresh and plain programs, a momentum-SGD step of the same model) beside the elements
of its K-FAC factors."""

import json
import math
import os
import re

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from jbp import models, parallel  # noqa: E402
from jbp.policy import LayerPolicy  # noqa: E402
from jbp.train import init_train_state, make_optimizer, make_train_step  # noqa: E402


def bn_init(key, input_shape, num_classes):
    """A small conv -> batch norm -> relu -> dense net (ResNet-20's ingredients, cheap)."""
    k = jax.random.split(key, 2)
    params = {"conv": {"w": jax.random.normal(k[0], (3, 3, input_shape[-1], 4)) / 3},
              "bn": {"gamma": jnp.ones(4), "beta": jnp.zeros(4)},
              "fc": {"w": jax.random.normal(k[1], (input_shape[0] * input_shape[1] * 4,
                                                    num_classes)) / 10,
                     "b": jnp.zeros(num_classes)}}
    return params, {"bn": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}


def bn_apply(params, state, x, *, train, layers=LayerPolicy()):
    h = layers.conv2d(x, params["conv"]["w"], padding="SAME")
    h, (mean, var) = layers.batch_norm(h, params["bn"]["gamma"], params["bn"]["beta"],
                                       state["bn"]["mean"], state["bn"]["var"], train=train)
    h = layers.relu(h)
    logits = layers.dense(layers.flatten(h), params["fc"]["w"], params["fc"]["b"])
    return logits, {"bn": {"mean": mean, "var": var}}


def all_reduced_elements(program, *args) -> int:
    """The elements all the all-reduces of ``program``'s compiled HLO (after XLA's passes, the
    combiner's tuples included) move: the result shapes of every ``all-reduce``."""
    total = 0
    for line in program.lower(*args).compile().as_text().splitlines():
        found = re.search(r"=\s*(.*?)\s+all-reduce(?:-start)?\(", line)
        if found:
            for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", found.group(1)):
                total += math.prod(int(d) for d in dims.split(",") if d)
    return total


def main():
    out = {"devices": jax.device_count()}
    bn_net = models.Model("bn_net", bn_init, bn_apply)
    for name, shape in (("lenet5", (28, 28, 1)), ("bn_net", (6, 6, 2))):
        model = models.get_model(name) if name == "lenet5" else bn_net
        opt = make_optimizer("kfac", 0.05, second_order_options={
            "refresh_every": 2, "invert_every": 2, "damping": 1e-2})
        state = init_train_state(model, opt, jax.random.key(0), shape, 10, dtype=jnp.float64)
        mesh = parallel.data_mesh()
        one = make_train_step(model.apply, opt, donate=False)
        sharded = make_train_step(model.apply, opt, donate=False, mesh=mesh)
        a, b = state, parallel.replicate(state, mesh)
        diffs = []
        for i in range(3):
            x = jax.random.normal(jax.random.key(10 + i), (8, *shape), jnp.float64)
            y = jnp.arange(8) % 10
            a, _ = one(a, x, y)
            b, _ = sharded(b, *parallel.global_batch(mesh, np.asarray(x), np.asarray(y)))
            moved = float(jnp.max(jnp.abs(jax.tree.leaves(a.params)[0]
                                          - jax.tree.leaves(state.params)[0])))
            diffs.append(max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(u)) + 1e-30))
                             for u, v in zip(jax.tree.leaves(a.params),
                                             jax.tree.leaves(parallel.local_view(b.params)))))
        out[name] = diffs
        out[name + "_moved"] = moved
        if name == "bn_net":
            x, y = parallel.global_batch(mesh, np.zeros((8, *shape)), np.arange(8) % 10)
            sgd = make_optimizer("momentum", 0.05)
            sgd_state = parallel.replicate(init_train_state(model, sgd, jax.random.key(0), shape,
                                                            10, dtype=jnp.float64), mesh)
            out["all_reduced"] = {
                "refresh": all_reduced_elements(sharded.programs["refresh"], b, x, y),
                "plain": all_reduced_elements(sharded.programs["plain"], b, x, y),
                "sgd": all_reduced_elements(make_train_step(model.apply, sgd, donate=False,
                                                            mesh=mesh), sgd_state, x, y),
                "factors": sum(f.size for f in jax.tree.leaves(a.opt_state.factors))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
