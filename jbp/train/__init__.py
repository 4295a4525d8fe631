"""Training: the jitted step (:mod:`.step`), optimisers and schedules (:mod:`.optim`).

    state = init_train_state(model, optimizer, key, input_shape, num_classes)
    step = make_train_step(model.apply, optimizer, "softmax_cross_entropy", grad="manual")
    for x, y in batches:
        state, metrics = step(state, x, y)          # donated: the old state's buffers are reused
"""

from jbp.train.optim import (OPTIMIZERS, SCHEDULES, make_optimizer, make_schedule,
                             optimizer_from_config)
from jbp.train.step import (PRECISIONS, TrainState, _loss_fn, evaluate, init_train_state,
                            leaf_names, make_eval_step, make_grad_fn, make_loss,
                            make_train_step, tree_size)

__all__ = ["OPTIMIZERS", "PRECISIONS", "SCHEDULES", "TrainState", "evaluate", "init_train_state",
           "leaf_names", "make_eval_step", "make_grad_fn", "make_loss", "make_optimizer",
           "make_schedule", "make_train_step", "optimizer_from_config", "tree_size"]
