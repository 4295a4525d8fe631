"""Every row of docs/errors.md: the example raises the stated exception with the stated text."""

import os
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import jbp
from jbp import checkpoint, config, data, torch_weights, train
from jbp.checkpoint import CheckpointError
from jbp.config import ConfigError
from jbp.data import DataError
from jbp.models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows():
    text = open(os.path.join(ROOT, "docs", "errors.md")).read()
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("`") and cells[2] != "exception":
            rows.append((cells[0], cells[1].strip("`"), cells[2], cells[3].strip("`")))
    return rows


ROWS = _rows()


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    lenet = train.init_train_state(get_model("lenet5"), optax.sgd(0.1), jax.random.key(0),
                                   (28, 28, 1), 10)
    resnet = train.init_train_state(get_model("resnet20"), optax.sgd(0.1), jax.random.key(0),
                                    (28, 28, 1), 10)
    path = checkpoint.save(str(d / "a"), lenet)
    corrupt = str(d / "ckpt-000000009.npz")
    open(corrupt, "wb").write(open(path, "rb").read()[:300])
    c3 = jnp.zeros((3,), jnp.float32)
    return dict(jbp=jbp, jnp=jnp, jax=jax, config=config, data=data, checkpoint=checkpoint,
                train=train, torch_weights=torch_weights,
                get_model=get_model, X=jnp.zeros((2, 8, 8, 3), jnp.float32),
                W=jnp.zeros((3, 3, 3, 4), jnp.float32), c3=c3, LENET=lenet,
                LENET_CKPT=path, RESNET20=resnet, CORRUPT_CKPT=corrupt)


def test_the_table_has_the_required_rows():
    mistakes = " ".join(r[0] for r in ROWS)
    for needed in ("NCHW", "rank-3", "kernel channels", "labels outside", "integer images",
                   "config value of the wrong type", "unknown config key", "missing data file",
                   "checkpoint from a different model"):
        assert needed in mistakes, needed
    assert len(ROWS) >= 25


@pytest.mark.parametrize("mistake,example,exception,excerpt", ROWS, ids=[r[0] for r in ROWS])
def test_row(names, mistake, example, exception, excerpt):
    errors = {"ValueError": ValueError, "TypeError": TypeError, "ConfigError": ConfigError,
              "DataError": DataError, "CheckpointError": CheckpointError}
    # The examples are what a user writes, with JAX's default float32 (the suite enables x64).
    with jax.enable_x64(False), pytest.raises(errors[exception], match=re.escape(excerpt)):
        eval(example, dict(names))
