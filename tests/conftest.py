"""Test configuration: float64 available everywhere (finite differences need it).

float32 tests pass float32 arrays explicitly; enabling x64 does not change their dtype.
"""

import jax

jax.config.update("jax_enable_x64", True)
