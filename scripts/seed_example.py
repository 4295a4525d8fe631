"""The source document's worked backpropagation example, reproduced with ONE stated fix.

The document (shared/seed/000_7d92f84cf24f5793.txt, "Example of Backpropagation" and "Code
Implementation in Python") trains a tiny CNN for one SGD step:

    x  = [[1, 2], [3, 4]]                 one 2x2 single-channel image, true class 0 (of 3)
    W1 = [[0.1, 0.2], [0.3, 0.4]], b1 = 0.1   one 2x2 filter, VALID  -> ONE activation z1
    a1 = relu(z1)
    z2 = W2 a1 + b2,  b2 = [0.1, 0.2, 0.3]  fully connected to 3 classes
    L  = -log softmax(z2)[0]                softmax cross-entropy
    θ <- θ - η ∂L/∂θ,  η = 0.1              one SGD step

THE FIX. As printed, its FC weights are 3x2, W2 = [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], but a 2x2
filter on a 2x2 input (VALID) yields one activation, so both its NumPy and its PyTorch snippet
raise a shape error. The one change made here: keep only the FIRST COLUMN of W2, i.e. FC weights
[[0.1], [0.3], [0.5]] (3 classes x 1 input); in jbp's (in, out) layout that is [[0.1, 0.3, 0.5]],
shape (1, 3). Every other number is the document's.

The same step is computed three ways, all in float64:
  - jbp's hand-written backward rules (jbp.conv2d, jbp.relu, jbp.dense, ...), "manual";
  - the same forward differentiated by JAX (jbp.autodiff.*), "autodiff";
  - PyTorch autograd (NCHW / OIHW / (out, in) layouts), if torch is installed.

Run:  python scripts/seed_example.py
It prints the three side by side with what the document printed, explains the difference, and
exits with status 1 if the three disagree by more than 1e-12, else 0.

Importable: ``run(grad)`` and ``torch_reference()`` return the same dict
``{"loss": float, "grads": {name: ndarray}, "params": {name: ndarray}}`` (updated params), with
names W1 (HWIO, 2x2x1x1), b1 (1,), W2 ((in, out) = 1x3), b2 (3,).
"""

import sys

import numpy as np

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)   # float64, so that 12 printed digits mean something

import jax.numpy as jnp  # noqa: E402

import jbp  # noqa: E402

# -----------------------------------------------------------------------------------------------
# The example's numbers (the document's, except W2: its first column only -- see the docstring)

X = [[1.0, 2.0], [3.0, 4.0]]              # input image
W1 = [[0.1, 0.2], [0.3, 0.4]]             # conv filter
B1 = [0.1]                                # conv bias
W2_DOCUMENT = [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]   # as printed: 3 classes x 2 inputs (cannot run)
W2 = [row[0] for row in W2_DOCUMENT]      # THE FIX: first column -> [0.1, 0.3, 0.5], one input
B2 = [0.1, 0.2, 0.3]                      # FC bias
LABEL = 0                                 # true class (y_true = [1, 0, 0])
ETA = 0.1                                 # SGD learning rate
TOL = 1e-12                               # float64 agreement required between the three methods

FIX = ("FIX: the document's FC weights are 3x2, but a 2x2 filter on a 2x2 input (VALID) gives ONE "
       "activation,\n     so its snippets cannot run. Only change made: keep W2's first column, "
       "FC weights [[0.1],[0.3],[0.5]]\n     (jbp (in,out) layout: [[0.1, 0.3, 0.5]]). "
       "All other inputs are the document's.")

# What the document printed as its "Output (approximated)". It printed no gradients.
# Its FC weights are 3x2; the fixed model has only their first column, so that is compared.
DOCUMENT_PRINTED = {
    "loss": 1.5,
    "W1": [[0.126, 0.252], [0.377, 0.503]],
    "b1": [0.126],
    "W2_3x2": [[0.287, 0.387], [0.223, 0.323], [0.390, 0.490]],
    "W2": [0.287, 0.223, 0.390],          # first column of the above
    "b2": [0.178, 0.168, 0.254],
}


def initial_params():
    """The parameters in jbp layouts: conv kernel HWIO (2,2,1,1), FC weights (in, out) = (1,3)."""
    return {
        "W1": jnp.asarray(W1, dtype=jnp.float64).reshape(2, 2, 1, 1),
        "b1": jnp.asarray(B1, dtype=jnp.float64),
        "W2": jnp.asarray(W2, dtype=jnp.float64).reshape(1, 3),
        "b2": jnp.asarray(B2, dtype=jnp.float64),
    }


def inputs():
    """The image as an NHWC batch of one, (1, 2, 2, 1), and its integer label, shape (1,)."""
    x = jnp.asarray(X, dtype=jnp.float64).reshape(1, 2, 2, 1)
    labels = jnp.asarray([LABEL])
    return x, labels


def loss_fn(params, x, labels, ops=jbp):
    """conv (VALID) -> ReLU -> flatten -> dense -> softmax cross-entropy.

    ``ops`` is ``jbp`` (hand-written backward rules) or ``jbp.autodiff`` (JAX-derived backward);
    both have the same forward computation.
    """
    z1 = ops.conv2d(x, params["W1"], params["b1"], padding="VALID")   # (1, 1, 1, 1): one value
    a1 = ops.relu(z1)
    z2 = ops.dense(ops.flatten(a1), params["W2"], params["b2"])       # (1, 3) logits
    return ops.softmax_cross_entropy(z2, labels)


def _as_numpy(tree):
    return {k: np.asarray(v, dtype=np.float64) for k, v in tree.items()}


def run(grad="manual"):
    """One SGD step with ``grad`` = "manual" (jbp) or "autodiff" (jbp.autodiff, JAX gradients).

    Returns ``{"loss": float, "grads": {name: ndarray}, "params": {name: ndarray}}`` where
    ``params`` are the parameters AFTER the step ``θ - η ∂L/∂θ``.
    """
    ops = {"manual": jbp, "autodiff": jbp.autodiff}[grad]
    params = initial_params()
    x, labels = inputs()
    loss, grads = jax.value_and_grad(loss_fn)(params, x, labels, ops)
    new_params = jax.tree.map(lambda p, g: p - ETA * g, params, grads)
    return {"loss": float(loss), "grads": _as_numpy(grads), "params": _as_numpy(new_params)}


def torch_reference():
    """The same step with PyTorch autograd in float64, or None if torch is not importable.

    PyTorch layouts: input NCHW, conv weight OIHW, linear weight (out, in). Results are converted
    back to jbp's layouts (HWIO, (in, out)) so the dict compares entry for entry with ``run``.
    """
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    f64 = torch.float64
    x = torch.tensor(X, dtype=f64).reshape(1, 1, 2, 2)                       # NCHW
    w1 = torch.tensor(W1, dtype=f64).reshape(1, 1, 2, 2).requires_grad_()   # OIHW
    b1 = torch.tensor(B1, dtype=f64).requires_grad_()
    w2 = torch.tensor(W2, dtype=f64).reshape(3, 1).requires_grad_()         # (out, in)
    b2 = torch.tensor(B2, dtype=f64).requires_grad_()
    labels = torch.tensor([LABEL])

    z1 = F.conv2d(x, w1, b1)                       # VALID: (1, 1, 1, 1)
    a1 = F.relu(z1)
    z2 = F.linear(a1.reshape(1, -1), w2, b2)       # (1, 3)
    loss = F.cross_entropy(z2, labels)
    loss.backward()

    def hwio(t):                                   # OIHW -> HWIO
        return t.detach().permute(2, 3, 1, 0).numpy()

    def in_out(t):                                 # (out, in) -> (in, out)
        return t.detach().T.numpy()

    grads = {"W1": hwio(w1.grad), "b1": b1.grad.numpy(), "W2": in_out(w2.grad), "b2": b2.grad.numpy()}
    with torch.no_grad():
        new = {"W1": hwio(w1 - ETA * w1.grad), "b1": (b1 - ETA * b1.grad).numpy(),
               "W2": in_out(w2 - ETA * w2.grad), "b2": (b2 - ETA * b2.grad).numpy()}
    return {"loss": loss.item(), "grads": _as_numpy(grads), "params": _as_numpy(new)}


# -----------------------------------------------------------------------------------------------
# Printing: one row per scalar

def rows(result):
    """Flatten a result dict to ``[(label, value)]``: loss, every gradient, every updated param."""
    out = [("loss", result["loss"])]
    for kind, prefix in (("grads", "dL/d"), ("params", "new ")):
        tree = result[kind]
        for i in range(2):
            for j in range(2):
                out.append((f"{prefix}W1[{i},{j}]", tree["W1"][i, j, 0, 0]))
        out.append((f"{prefix}b1", tree["b1"][0]))
        for k in range(3):
            out.append((f"{prefix}W2[{k}]", tree["W2"][0, k]))
        for k in range(3):
            out.append((f"{prefix}b2[{k}]", tree["b2"][k]))
    return out


def document_rows():
    """The document's printed value for each row label, where it printed one."""
    d = DOCUMENT_PRINTED
    printed = {"loss": d["loss"], "new b1": d["b1"][0]}
    for i in range(2):
        for j in range(2):
            printed[f"new W1[{i},{j}]"] = d["W1"][i][j]
    for k in range(3):
        printed[f"new W2[{k}]"] = d["W2"][k]
        printed[f"new b2[{k}]"] = d["b2"][k]
    return printed


def max_abs_diff(a, b):
    """Largest absolute difference between two result dicts, over every row."""
    return max(abs(va - vb) for (_, va), (_, vb) in zip(rows(a), rows(b)))


def explanation(result):
    """4 lines on why the document's printed numbers differ from the true ones (computed here)."""
    y = np.eye(3)[LABEL]
    w2 = np.asarray(W2)
    # Its printed FC-bias update b2 - η(ŷ - y) tells which softmax ŷ it used ...
    dz2_doc = (np.asarray(B2) - np.asarray(DOCUMENT_PRINTED["b2"])) / ETA
    p_doc = y + dz2_doc
    # ... its printed FC-weight update W2 - η a1 (ŷ - y) then tells which activation it used ...
    a1_doc = np.mean((w2 - np.asarray(DOCUMENT_PRINTED["W2"])) / ETA / dz2_doc)
    # ... and its printed conv update W1 - η δ1 x which δ1 = dL/dz1 it used.
    d1_doc = np.mean((np.asarray(W1) - np.asarray(DOCUMENT_PRINTED["W1"])) / ETA / np.asarray(X))
    fmt = lambda v: "[" + ", ".join(f"{t:.4f}" for t in v) + "]"  # noqa: E731
    return "\n".join([
        f"Why the document differs: its loss and FC-bias update imply softmax {fmt(p_doc)} "
        f"(-log {p_doc[0]:.2f} = {-np.log(p_doc[0]):.2f});",
        f"  the true softmax is {fmt(y + result['grads']['b2'])}, loss {result['loss']:.4f}. "
        f"Its FC-weight update implies activation {a1_doc:.2f}, the conv gives 3.1,",
        f"  and neither gives its softmax. Its conv update moves W1 UP (implied dL/dz1 = {d1_doc:+.3f}), but "
        f"dL/dz1 = W2.(softmax - y) > 0 ({result['grads']['b1'][0]:+.4f}; "
        f"{w2 @ dz2_doc:+.3f} from its own softmax): W1 must go DOWN.",
        "  Its snippets also crash as printed (3x2 FC weights vs one activation): see FIX above.",
    ])


def main():
    manual, autodiff, torch_res = run("manual"), run("autodiff"), torch_reference()
    printed = document_rows()
    torch_rows = rows(torch_res) if torch_res is not None else None

    print("The document's worked example: 2x2 image -> 2x2 conv (VALID) -> ReLU -> FC(3) -> "
          "softmax CE, true class 0, one SGD step, eta = 0.1, float64.")
    print(FIX)
    print()
    head = ("quantity", "jbp manual", "jax.grad (jbp.autodiff)", "PyTorch", "document printed")
    line = "{:<13} {:>17} {:>24} {:>25} {:>17}"
    print(line.format(*head))
    print("-" * 100)
    for n, ((label, vm), (_, va)) in enumerate(zip(rows(manual), rows(autodiff))):
        vt = f"{torch_rows[n][1]:.12f}" if torch_rows else "n/a (torch not installed)"
        doc = f"{printed[label]:.3f}" if label in printed else "-"
        if label.startswith("new W2"):
            doc += " (col 0)"
        print(line.format(label, f"{vm:.12f}", f"{va:.12f}", vt, doc))
    print("-" * 100)
    print("document printed: its 'Output (approximated)'; it printed no gradients, and for the FC "
          "weights the first column of its 3x2 matrix.")
    print()

    diffs = {"manual vs autodiff": max_abs_diff(manual, autodiff)}
    if torch_res is not None:
        diffs["manual vs PyTorch"] = max_abs_diff(manual, torch_res)
        diffs["autodiff vs PyTorch"] = max_abs_diff(autodiff, torch_res)
    for name, d in diffs.items():
        print(f"max |difference| {name:<20}: {d:.3e}  ({'ok' if d <= TOL else 'FAIL'}, tol {TOL:g})")
    if torch_res is None:
        print("PyTorch not installed: compared manual vs autodiff only.")
    print()
    print(explanation(manual))

    ok = all(d <= TOL for d in diffs.values())
    print()
    if ok:
        print(f"AGREE: {', '.join(['manual', 'autodiff'] + ['PyTorch'] * (torch_res is not None))}"
              f" within {TOL:g} -> exit 0")
    else:
        print(f"DISAGREE beyond {TOL:g} -> exit 1")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
