"""The document's worked example (scripts/seed_example.py) against a hand calculation.

The hand calculation below uses only the Python standard library (no jbp, no JAX, no NumPy), so
it is an independent check of jbp's hand-written backward rules, of JAX's autodiff of the same
forward, and of PyTorch autograd. The model is the document's, with its one stated fix: the FC
weights are the first column [0.1, 0.3, 0.5] of its (unrunnable) 3x2 matrix.
"""

import importlib.util
import math
import os

import jax
import pytest

jax.config.update("jax_enable_x64", True)   # float64 throughout (the script does this too)

TOL = 1e-12
ETA = 0.1


def _load_script():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "scripts", "seed_example.py")
    spec = importlib.util.spec_from_file_location("seed_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seed_example = _load_script()


def hand_calculation():
    """The example worked out by hand, step by step; returns ``{label: value}`` per scalar."""
    x = [[1.0, 2.0], [3.0, 4.0]]
    w1 = [[0.1, 0.2], [0.3, 0.4]]
    b1 = 0.1
    w2 = [0.1, 0.3, 0.5]          # first column of the document's 3x2 FC weights (the fix)
    b2 = [0.1, 0.2, 0.3]
    y = [1.0, 0.0, 0.0]           # true class 0

    # Forward.
    z1 = 1 * 0.1 + 2 * 0.2 + 3 * 0.3 + 4 * 0.4 + 0.1            # the 2x2 VALID conv: 3.1
    assert math.isclose(z1, sum(x[i][j] * w1[i][j] for i in range(2) for j in range(2)) + b1)
    a1 = max(z1, 0.0)                                             # ReLU
    z2 = [a1 * w2[k] + b2[k] for k in range(3)]                   # FC: [0.41, 1.13, 1.85]
    m = max(z2)
    e = [math.exp(v - m) for v in z2]
    p = [v / sum(e) for v in e]                                   # softmax
    loss = -math.log(p[0])                                        # cross-entropy, class 0

    # Backward.
    dz2 = [p[k] - y[k] for k in range(3)]                         # dL/dz2 = p - onehot
    dw2 = [a1 * dz2[k] for k in range(3)]                         # dL/dW2 = a1 dz2
    db2 = dz2                                                     # dL/db2 = dz2
    delta1 = sum(w2[k] * dz2[k] for k in range(3)) * (1.0 if z1 > 0 else 0.0)  # through ReLU
    dw1 = [[delta1 * x[i][j] for j in range(2)] for i in range(2)]              # dL/dW1 = δ1 x
    db1 = delta1                                                                # dL/db1 = δ1

    values = {"loss": loss}
    for i in range(2):
        for j in range(2):
            values[f"dL/dW1[{i},{j}]"] = dw1[i][j]
    values["dL/db1"] = db1
    for k in range(3):
        values[f"dL/dW2[{k}]"] = dw2[k]
    for k in range(3):
        values[f"dL/db2[{k}]"] = db2[k]
    # SGD: θ - η dL/dθ.
    for i in range(2):
        for j in range(2):
            values[f"new W1[{i},{j}]"] = w1[i][j] - ETA * dw1[i][j]
    values["new b1"] = b1 - ETA * db1
    for k in range(3):
        values[f"new W2[{k}]"] = w2[k] - ETA * dw2[k]
    for k in range(3):
        values[f"new b2[{k}]"] = b2[k] - ETA * db2[k]
    return values


def mismatches(result_rows, expected, tol=TOL):
    """Labels where ``result_rows`` (``[(label, value)]``) differ from ``expected`` beyond tol."""
    got = dict(result_rows)
    assert set(got) == set(expected), f"rows differ: {set(got) ^ set(expected)}"
    return {k: (float(got[k]), expected[k]) for k in expected
            if not abs(float(got[k]) - expected[k]) <= tol}


def test_hand_calculation_is_the_example():
    """A few anchors of the hand calculation that can be checked by eye."""
    hand = hand_calculation()
    assert math.isclose(hand["loss"], 1.9844615486584, abs_tol=1e-12)
    assert math.isclose(hand["dL/db1"], 0.2885398954372, abs_tol=1e-12)
    assert hand["dL/db2[0]"] < 0 < hand["dL/db2[1]"] < hand["dL/db2[2]"]


@pytest.mark.parametrize("grad", ["manual", "autodiff"])
def test_jbp_matches_hand_calculation(grad):
    result = seed_example.run(grad)
    for tree in (result["grads"], result["params"]):
        assert all(v.dtype.name == "float64" for v in tree.values())
    assert mismatches(seed_example.rows(result), hand_calculation()) == {}


def test_manual_matches_autodiff():
    manual, autodiff = seed_example.run("manual"), seed_example.run("autodiff")
    assert seed_example.max_abs_diff(manual, autodiff) <= TOL


def test_torch_matches_hand_calculation_and_jbp():
    pytest.importorskip("torch", reason="PyTorch not installed: torch oracle skipped")
    ref = seed_example.torch_reference()
    assert ref is not None
    assert mismatches(seed_example.rows(ref), hand_calculation()) == {}
    assert seed_example.max_abs_diff(seed_example.run("manual"), ref) <= TOL


def test_checker_detects_a_wrong_gradient():
    """The comparison can fail: a sign-flipped dL/dW1 (as the document's update implies) is caught."""
    result = seed_example.run("manual")
    result["grads"]["W1"] = -result["grads"]["W1"]
    bad = mismatches(seed_example.rows(result), hand_calculation())
    assert set(bad) == {f"dL/dW1[{i},{j}]" for i in range(2) for j in range(2)}


def test_document_printed_numbers_are_not_the_true_ones():
    """What the document printed disagrees with the hand calculation (docs/seed_example.md)."""
    hand = hand_calculation()
    printed = seed_example.document_rows()
    assert abs(printed["loss"] - hand["loss"]) > 0.4
    for i in range(2):                       # it moved the conv weights up; they must go down
        for j in range(2):
            label = f"new W1[{i},{j}]"
            assert printed[label] > seed_example.W1[i][j] > hand[label]


def test_script_main_exits_zero(capsys):
    assert seed_example.main() == 0
    out = capsys.readouterr().out
    assert "FIX" in out and "[[0.1],[0.3],[0.5]]" in out
    assert "document printed" in out
