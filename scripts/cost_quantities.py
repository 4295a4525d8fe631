"""XLA's static cost of jbp.quantities against a gradient and the jax.vmap(jax.grad) route:
FLOPs, bytes accessed (``compiled.cost_analysis()``) and temp memory
(``compiled.memory_analysis()``) of each compiled program. No timing: what the compiler
plans, the same on a loaded machine; scripts/bench.py times the same variants.

    python scripts/cost_quantities.py            # LeNet-5 b128, ResNet-20 (no BN) b32

Convolutions run XLA's forms (``jbp.set_conv_backend("xla")``): oneDNN's calls are opaque to
the cost analysis. XLA counts a grouped convolution's FLOPs as it lowers it, so the vmap route's
FLOPs are not comparable; its bytes and temp memory are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jbp
from jbp import models, quantities
from jbp.config import ModelConfig
from jbp.policy import LayerPolicy
from jbp.train import make_loss

CASES = (("lenet5", {}, 128, (28, 28, 1)), ("resnet20", {"batch_norm": False}, 32, (32, 32, 3)))


def cost(f, *args):
    compiled = jax.jit(f).lower(*args).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return (analysis.get("flops", float("nan")) / 1e9,
            analysis.get("bytes accessed", float("nan")) / 2 ** 20,
            compiled.memory_analysis().temp_size_in_bytes / 2 ** 20)


def main() -> None:
    jbp.set_conv_backend("xla")
    print("| model | program | GFLOP | × grad | MiB accessed | × grad | temp MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, options, n, shape in CASES:
        model = models.from_config(ModelConfig(name=name, **options))
        params, state = model.init(jax.random.key(0), shape, 10)
        x, y = jnp.zeros((n, *shape)), jnp.zeros((n,), jnp.int32)
        loss = make_loss(model.apply, grad="manual")
        programs = {"gradient (jbp rules)": lambda p: jax.grad(
            lambda p: loss(p, state, x, y)[0])(p)}
        for q in ("batch_l2", "batch_grad", "diag_ggn"):
            programs[q] = lambda p, q=q: quantities.compute(model.apply, p, state, x, y,
                                                            quantities=(q,))[q]

        def vmap_route(p):
            def ell(pp, xn, yn):
                logits, _ = model.apply(pp, state, xn[None], train=False,
                                        layers=LayerPolicy("autodiff"))
                return jbp.autodiff.softmax_cross_entropy(logits, yn[None])
            g = jax.vmap(jax.grad(ell), (None, 0, 0))(p, x, y)
            return (jax.tree.map(lambda a: jnp.sum(a.reshape(n, -1) ** 2, 1), g),
                    jax.tree.map(lambda a: a.mean(0), g))
        programs["vmap(grad), norms, mean"] = vmap_route
        base = None
        for label, fn in programs.items():
            flops, moved, temp = cost(fn, params)
            base = base or (flops, moved)
            print(f"| {name} b{n} | {label} | {flops:.3f} | {flops / base[0]:.2f} | {moved:.1f} "
                  f"| {moved / base[1]:.2f} | {temp:.1f} |", flush=True)


if __name__ == "__main__":
    main()
