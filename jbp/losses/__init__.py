"""Losses with hand-written backwards: where the backward pass starts. One file per family,
its default rule and its weighted rule (PyTorch's options) side by side:

- ``cross_entropy.py``: ``softmax_cross_entropy`` (integer or soft labels, label smoothing,
  class ``weight``, ``ignore_index``);
- ``binary_cross_entropy.py``: ``sigmoid_binary_cross_entropy`` (element ``weight``,
  ``pos_weight``);
- ``mean_squared_error.py``: ``mse``;
- ``_reduction.py``: the reductions ``"mean"``, ``"sum"``, ``"none"`` and their cotangents, and
  the checks the three share.

Equations (EQUATIONS.md, "Loss"), for a batch of ``N`` examples, ``g`` the incoming cotangent of
the scalar loss (1 under ``jax.grad``)::

    softmax cross-entropy:  L = −(1/N) Σ_n Σ_k y_nk log ŷ_nk,   ŷ = softmax(z)
                            δ = ∂L/∂z = (ŷ Σ_k y_k − y) / N   = (ŷ − y)/N for labels summing to 1
                            ∂L/∂y = −log ŷ / N               (soft labels are differentiable)
    MSE:                    L = mean((ŷ − y)²),   δ = 2(ŷ − y)/size,   ∂L/∂y = −δ
    sigmoid + BCE:          L = mean(softplus(z) − z y),   δ = (σ(z) − y)/size,   ∂L/∂y = −z/size

``log ŷ`` is computed from the logits by log-sum-exp, never as ``log(softmax)``, so logits of
±1e4 give finite losses and gradients. By default all losses are means, returned as scalars of
the input dtype (half precision is accumulated in float32). With an option set (a reduction,
weights, ignored labels), the public function calls the family's weighted rule instead, whose
equations are in ``_reduction.py`` and beside each rule.

``jbp.softmax_cross_entropy`` & co. are the hand-written versions, ``jbp.autodiff.X`` the twins;
they are declared in these files (``jbp._registry``).
"""
