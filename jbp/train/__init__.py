"""Training: the jitted step (:mod:`.step`), optimisers and schedules (:mod:`.optim`), a whole
run as one call (:func:`fit`, :mod:`.loop`), its run directory (:mod:`.run_dir`) and how it is
stopped early (:mod:`.stop`).

    summary = jbp.train.fit(jbp.config.load("configs/lenet_mnist.toml"), "runs/mine")

or, a step at a time:

    state = init_train_state(model, optimizer, key, input_shape, num_classes)
    step = make_train_step(model.apply, optimizer, "softmax_cross_entropy", grad="manual")
    for x, y in batches:
        state, metrics = step(state, x, y)          # donated: the old state's buffers are reused
"""

from jbp.train.optim import (OPTIMIZERS, SCHEDULES, make_optimizer, make_schedule,
                             optimizer_from_config)
from jbp.train.step import (PRECISIONS, TrainState, evaluate, init_optimizer, init_train_state,
                            leaf_names, make_eval_step, make_grad_fn, make_loss,
                            make_train_step, tree_size)
from jbp.train.stop import Stop, StopRequest
from jbp.train.run_dir import RunDirError, load_config
from jbp.train.loop import FitError, NonFiniteError, fit

__all__ = ["OPTIMIZERS", "PRECISIONS", "SCHEDULES", "FitError", "NonFiniteError", "RunDirError",
           "Stop", "StopRequest", "TrainState", "evaluate", "fit", "init_optimizer",
           "init_train_state",
           "leaf_names", "load_config", "make_eval_step", "make_grad_fn", "make_loss",
           "make_optimizer", "make_schedule", "make_train_step", "optimizer_from_config",
           "tree_size"]
