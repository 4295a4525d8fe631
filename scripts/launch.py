"""Start N local JAX processes for one data-parallel run, on this machine (127.0.0.1).

    python scripts/launch.py --processes 2 --devices-per-process 2 -- scripts/train.py --out runs/dp

Each child runs ``python SCRIPT ARGS...`` with the settings ``jax.distributed.initialize`` reads:
``JAX_COORDINATOR_ADDRESS=127.0.0.1:<a free port>``, and ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID``, which ``scripts/train.py`` passes on (``jbp.train.initialize_distributed``).
``--devices-per-process K`` gives each child K host (CPU) devices
(``--xla_force_host_platform_device_count``); on GPUs use ``--visible-devices`` instead, one
process per GPU or a few each. CPU collectives between the processes use gloo.

Output of process i is prefixed ``[i]``. The launcher returns the first non-zero exit status
(0 when every process succeeded). If one process fails, or ``--timeout`` seconds pass, or the
launcher is interrupted, every child still running is terminated (then killed): none outlives it.
On a real cluster (SLURM, Open MPI, Cloud TPU) do not use this script: start ``scripts/train.py``
with the cluster's launcher and JAX detects the processes itself.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, port: int, devices: int | None,
              visible: str | None) -> dict:
    env = dict(os.environ)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
    if devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    if visible:
        groups = visible.split(";")
        env["CUDA_VISIBLE_DEVICES"] = groups[process_id % len(groups)]
    return env


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def stop_all(procs, grace: float = 5.0) -> None:
    """Terminate, then kill, every child still running; wait for all of them."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(command, num_processes: int, *, devices: int | None = None,
           visible: str | None = None, timeout: float | None = None) -> int:
    port = free_port()
    procs, pumps = [], []
    try:
        for i in range(num_processes):
            p = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True,
                                 env=child_env(i, num_processes, port, devices, visible))
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}]"), daemon=True)
            t.start()
            pumps.append(t)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                print(f"launch: a process exited with status {failed[0]}; stopping the others",
                      file=sys.stderr)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch: timed out after {timeout:.0f} s; stopping every process",
                      file=sys.stderr)
                return 124
            time.sleep(0.1)
    finally:
        stop_all(procs)
        for t in pumps:
            t.join(timeout=1.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --processes N [options] -- SCRIPT [ARGS...]")
    parser.add_argument("--processes", type=int, required=True, help="number of processes")
    parser.add_argument("--devices-per-process", type=int, metavar="K",
                        help="host (CPU) devices per process")
    parser.add_argument("--visible-devices", metavar="LIST",
                        help="CUDA_VISIBLE_DEVICES per process, ';'-separated, e.g. '0;1'")
    parser.add_argument("--timeout", type=float, help="seconds before every process is stopped")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        parser.error("give the script to run after --, e.g. -- scripts/train.py --out runs/dp")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("nothing to run after --")
    if args.processes < 1:
        parser.error(f"--processes: expected at least 1, got {args.processes}")
    return launch(command, args.processes, devices=args.devices_per_process,
                  visible=args.visible_devices, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
