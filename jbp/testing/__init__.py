"""Test scaffolding shared by the tests, ``scripts/gradcheck.py`` and ``scripts/bench.py``.

Not part of the training library; nothing under ``jbp`` outside this package imports it.

- :mod:`jbp.testing.grid`: the gradient-check grid, :data:`~jbp.testing.grid.CASES`, one
  :class:`~jbp.testing.case.Case` per layer configuration; :mod:`jbp.testing.option_grid` holds
  the cases of PyTorch's options (ceil mode, padding modes, loss reductions and weights...).
- :mod:`jbp.testing.torch_reference`: each grid layer in ``torch.nn.functional`` (NHWC in, NHWC
  out) and :func:`~jbp.testing.torch_reference.torch_vjp`; torch is imported only when used.
- :mod:`jbp.testing.reference_models`: LeNet-5 and the ResNets written in plain ``lax``/``jnp``
  (differentiated by ``jax.grad``) and in PyTorch, on jbp's parameter pytrees.
- :mod:`jbp.testing.torchvision_loader`: ``import torchvision`` on the CPU torch build, whose
  compiled torchvision ops do not load (the models are pure Python).
"""
