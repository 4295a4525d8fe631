"""Stopping a training run early: :class:`Stop` is what :func:`jbp.train.fit` asks, and
:class:`StopRequest` answers it from SIGINT/SIGTERM (scripts/train.py).

``fit`` reads ``stop.reason`` after every step, evaluation and checkpoint write: once it is set,
the run writes a checkpoint and returns (``status="stopped"``), so ``fit(..., resume=True)``
continues it. ``fit`` sets ``stop.started`` when the first step has finished, announces where it
is with ``stop.reached(phase)`` and lists in ``stop.cleanup`` the files (then directories) it
created, which :class:`StopRequest` removes on a stop before the first step.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import List, Optional

#: fit's phases (``reached``), with how a stop before the first step describes them.
PHASES = {"import": "start-up (imports)", "data": "start-up (loading data)",
          "compile": "compilation and the first step", "first-step": None, "eval": None,
          "checkpoint": None}


class Stop:
    """Never stops by itself; set ``reason`` (e.g. from another thread) to stop a run at the
    next step boundary. Subclass it to stop on something else (a time budget)."""

    def __init__(self):
        self.reason: Optional[str] = None   # why to stop, e.g. "SIGINT"; None: keep going
        self.started = False                # a step has finished: a stop writes a checkpoint
        self.phase = "start-up"
        self.cleanup: List[str] = []        # files (then directories) this start created

    def reached(self, phase: str) -> None:
        """fit is at ``phase`` (a key of :data:`PHASES`)."""
        self.phase = PHASES[phase] or self.phase


class StopRequest(Stop):
    """SIGINT/SIGTERM at any moment, without a traceback.

    Until the first training step has finished (data, compilation, the first step) there is
    nothing to resume: the signal prints one line, removes the files this start created and
    exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM) at once. Python runs
    signal handlers only between bytecodes of the main thread, so a thread also watches a wake-up
    fd that the C-level handler writes: that ends a stop requested while XLA compiles.

    Once a step has finished, the signal only sets ``reason``: fit finishes the step, the
    evaluation or the checkpoint write in progress, writes a checkpoint and returns.

    ``JBP_TEST_SIGNAL=SIGINT@phase`` (tests only) makes the process signal itself on reaching
    ``phase``: data, compile (from another thread, as XLA starts compiling the train step),
    first-step, eval, checkpoint (scripts/train.py handles "import" before jbp is loaded).
    """

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True).start()
        test = os.environ.get("JBP_TEST_SIGNAL", "")
        self._test_signal, _, self._test_phase = test.partition("@")

    def _handle(self, signum, _frame):
        if not self.started:
            self._exit_early(signum)
        self.reason = self.reason or signal.Signals(signum).name

    def _watch(self, fd):
        while True:
            for signum in os.read(fd, 64):
                if not self.started:
                    self._exit_early(signum)

    def _exit_early(self, signum):
        with self._lock:                # the handler and the watcher may both get here
            for path in self.cleanup:
                try:
                    os.rmdir(path) if os.path.isdir(path) else os.unlink(path)
                except OSError:
                    pass
            os.write(2, early_stop_line(signum, self.phase).encode())
            os._exit(128 + signum)

    def reached(self, phase):
        """Mark a phase; the test hook signals here (for "compile": while XLA compiles)."""
        super().reached(phase)
        if phase != self._test_phase:
            return
        signum = signal.Signals[self._test_signal]
        if phase == "compile":
            import jax  # noqa: PLC0415
            fired = []

            def after_lowering(event, _duration, **_kw):
                if event.endswith("jaxpr_to_mlir_module_duration") and not fired:
                    fired.append(event)     # XLA's backend compile starts next: the signal
                    # comes from another thread while the main thread enters it
                    threading.Thread(target=os.kill, args=(os.getpid(), signum)).start()
            jax.monitoring.register_event_duration_secs_listener(after_lowering)
        else:
            os.kill(os.getpid(), signum)


def early_stop_line(signum: int, phase: str) -> str:
    """The one line a stop before the first finished step prints."""
    return (f"{signal.Signals(signum).name}: stopped during {phase}, before the first training "
            f"step finished; nothing to resume.\n")
