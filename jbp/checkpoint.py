"""Checkpoints of a whole :class:`jbp.train.TrainState`: atomic, checksummed, pickle-free.

A checkpoint is one ``.npz`` file, ``ckpt-<step>.npz``, in a run directory:

- one array per pytree leaf (``leaf_0``, ``leaf_1``, ...), PRNG keys stored as their key data;
- ``manifest``: UTF-8 JSON as a uint8 array — format version, step, each leaf's path, shape and
  dtype, the data-order position (e.g. epoch and batch), the resolved config text, and the
  SHA-256 of the arrays.

Loading never executes code (``allow_pickle=False``; the tree structure comes from the model the
caller builds, checked leaf by leaf against the manifest). Writing is atomic: a temp file in the
same directory, fsync, ``os.replace``, fsync of the directory; only the last ``keep`` checkpoints
up to the one just written are kept (a checkpoint with a higher step is not this run's past, and
the one just written is never pruned). A torn or tampered file fails its zip CRC or the SHA-256
and :func:`restore_latest` falls back to the previous good one with a warning naming both files.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
import warnings
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jbp.data import arrays_digest

FORMAT_VERSION = 1
_NAME = re.compile(r"ckpt-(\d+)\.npz$")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it is restored into."""


def _leaves_with_paths(tree) -> List[Tuple[str, Any]]:
    return [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:          # not supported on this platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Every file scripts/train.py writes into a run directory (besides the checkpoints).
RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "curves.png", "nonfinite_batch.json")
_TEMP = re.compile(r"\.ckpt-.*\.tmp$")


def run_files(directory: str) -> List[str]:
    """Names of the files of a training run in ``directory`` (empty if it holds none).

    A run is its ``RUN_FILES``, its ``ckpt-*.npz`` checkpoints and leftover ``.ckpt-*.tmp`` files
    of an interrupted write; nothing else in the directory is counted (or removed by
    :func:`clear_run`).
    """
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory)
                  if name in RUN_FILES or _NAME.fullmatch(name) or _TEMP.match(name))


def clear_run(directory: str) -> List[str]:
    """Delete the run's files (:func:`run_files`) from ``directory``; returns their names."""
    removed = run_files(directory)
    for name in removed:
        os.unlink(os.path.join(directory, name))
    return removed


def _step_of(path: str) -> int:
    return int(_NAME.search(os.path.basename(path)).group(1))


def checkpoint_paths(directory: str) -> List[str]:
    """The run's checkpoints, oldest first."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(directory, "ckpt-*.npz"))
             if (m := _NAME.search(os.path.basename(p)))]
    return [p for _, p in sorted(found)]


def save(directory: str, state, *, position: Optional[dict] = None, config: str = "",
         keep: int = 3) -> str:
    """Write ``state`` (any pytree of arrays with a ``step``) atomically; keep the last ``keep``.

    Pruning counts only checkpoints up to this one's step, so the file just written is never
    deleted, even if the directory holds higher-numbered checkpoints (scripts/train.py refuses to
    start a new run in a directory that holds one, see :func:`run_files`).
    """
    if keep < 1:
        raise ValueError(f"keep: expected >= 1, got {keep}")
    os.makedirs(directory, exist_ok=True)
    arrays, leaves = {}, []
    for i, (path, leaf) in enumerate(_leaves_with_paths(state)):
        entry = {"path": path}
        if _is_key(leaf):
            entry["prng_impl"] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        value = np.asarray(jax.device_get(leaf))
        entry.update(shape=list(value.shape), dtype=value.dtype.str)
        arrays[f"leaf_{i}"] = value
        leaves.append(entry)
    step = int(state.step)
    manifest = {"version": FORMAT_VERSION, "step": step, "leaves": leaves,
                "position": position or {}, "config": config,
                "sha256": arrays_digest(arrays)}
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    final = os.path.join(directory, f"ckpt-{step:09d}.npz")
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)
    history = [p for p in checkpoint_paths(directory) if _step_of(p) <= step]   # ends with final
    for old in history[:-keep]:
        os.unlink(old)
    return final


def read(path: str) -> Tuple[dict, List[np.ndarray]]:
    """Manifest and leaf arrays of one checkpoint, verified; CheckpointError if it is bad."""
    try:
        with np.load(path, allow_pickle=False) as f:
            manifest = json.loads(bytes(f["manifest"]).decode())
            arrays = {f"leaf_{i}": f[f"leaf_{i}"] for i in range(len(manifest["leaves"]))}
    except Exception as e:    # BadZipFile, CRC errors, EOFError, KeyError, JSON errors
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('version')}, expected "
                              f"{FORMAT_VERSION}")
    digest = arrays_digest(arrays)
    if digest != manifest.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch (arrays SHA-256 {digest[:16]}..., "
                              f"manifest says {str(manifest.get('sha256'))[:16]}...)")
    return manifest, [arrays[f"leaf_{i}"] for i in range(len(arrays))]


def restore(path: str, like) -> Tuple[Any, dict]:
    """Load ``path`` into the structure of ``like`` (e.g. a freshly initialised TrainState).

    Fails, naming the first mismatching leaf, if the checkpoint was written by another model.
    """
    return _fit(path, *read(path), like)


def _fit(path: str, manifest: dict, arrays: List[np.ndarray], like) -> Tuple[Any, dict]:
    """Verified checkpoint contents -> a pytree shaped like ``like``, leaf by leaf."""
    template = _leaves_with_paths(like)
    saved = manifest["leaves"]
    if len(saved) != len(template):
        first = _first_difference([e["path"] for e in saved], [p for p, _ in template])
        raise CheckpointError(f"{path}: has {len(saved)} leaves, the model has {len(template)}; "
                              f"first differing leaf: {first}")
    leaves = []
    for entry, value, (path_here, leaf) in zip(saved, arrays, template):
        want = jax.random.key_data(leaf) if _is_key(leaf) else leaf
        if entry["path"] != path_here or tuple(value.shape) != tuple(np.shape(want)):
            raise CheckpointError(
                f"{path}: leaf {entry['path']} has shape {tuple(value.shape)}, but the model's "
                f"leaf {path_here} has shape {tuple(np.shape(want))}: the checkpoint is from a "
                f"different model or configuration")
        if _is_key(leaf):
            leaves.append(jax.random.wrap_key_data(jnp.asarray(value),
                                                   impl=jax.random.key_impl(leaf)))
        else:
            leaves.append(jnp.asarray(value, dtype=np.dtype(entry["dtype"])))
    return jax.tree.unflatten(jax.tree.structure(like), leaves), manifest


class Weights(NamedTuple):
    """A model's weights without an optimiser: what ``scripts/convert_torch_weights.py`` writes
    (with :func:`save`) and ``model.init_from`` starts a run from (:func:`restore_weights`)."""

    params: Any
    model_state: Any
    step: Any = 0


_WEIGHT_FIELDS = (".params", ".model_state")


def restore_weights(path: str, params_like, state_like,
                    fresh: Sequence[str] = ()) -> Tuple[Any, Any]:
    """The ``params`` and ``model_state`` of the checkpoint ``path`` — a :class:`Weights` file or
    a training run's checkpoint (its optimiser state and step are ignored) — in the structure
    and dtypes of ``params_like``/``state_like``. A leaf that is missing, extra or of another
    shape is a CheckpointError naming it.

    ``fresh`` names top-level entries of the params (e.g. ``("fc",)``, the classifier of every
    classification model) whose leaves, and any batch-norm state under the same name, keep
    their values from ``params_like``/``state_like`` instead: the usual fine-tuning of a
    1000-class ImageNet checkpoint with a new head of ``num_classes``. Their saved shapes may
    differ; every other leaf must fit."""
    manifest, arrays = read(path)
    saved = [(e["path"], a) for e, a in zip(manifest["leaves"], arrays)
             if e["path"].startswith(_WEIGHT_FIELDS)]
    template = [(p, leaf) for p, leaf in _leaves_with_paths(Weights(params_like, state_like))
                if p.startswith(_WEIGHT_FIELDS)]
    unknown = [name for name in fresh if name not in params_like]
    if unknown:
        raise CheckpointError(f"model.init_fresh: {unknown[0]!r} is not a top-level parameter "
                              f"of the model (it has {', '.join(sorted(params_like))})")
    prefixes = tuple(f"{field}[{name!r}]" for field in _WEIGHT_FIELDS for name in fresh)
    if [p for p, _ in saved] != [p for p, _ in template]:
        first = _first_difference([p for p, _ in saved], [p for p, _ in template])
        raise CheckpointError(f"{path}: its weights do not fit the model ({len(saved)} leaves, "
                              f"the model has {len(template)}); first differing leaf: {first}")
    leaves = []
    for (name, value), (_, leaf) in zip(saved, template):
        if name.startswith(prefixes):
            leaves.append(leaf)
            continue
        if tuple(value.shape) != tuple(np.shape(leaf)):
            raise CheckpointError(f"{path}: leaf {name} has shape {tuple(value.shape)}, the "
                                  f"model's has {tuple(np.shape(leaf))}: the weights are of "
                                  f"another model or configuration (num_classes, channels); "
                                  f"to start a layer afresh (a new classifier head), name it in "
                                  f"model.init_fresh, e.g. [\"fc\"]")
        leaves.append(jnp.asarray(value, dtype=leaf.dtype))
    n = len(jax.tree.leaves(params_like))
    return (jax.tree.unflatten(jax.tree.structure(params_like), leaves[:n]),
            jax.tree.unflatten(jax.tree.structure(state_like), leaves[n:]))


def _first_difference(a: List[str], b: List[str]) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x} (checkpoint) vs {y} (model)"
    return (a[len(b)] + " (checkpoint only)") if len(a) > len(b) else (b[len(a)] + " (model only)")


def restore_latest(directory: str, like) -> Tuple[Any, dict, str]:
    """The newest checkpoint that verifies; warns for each bad one it skips.

    A model mismatch is not skipped: it raises at once (an older file would not fit either).
    """
    paths = checkpoint_paths(directory)
    if not paths:
        raise CheckpointError(f"{directory}: no checkpoints (ckpt-*.npz) to resume from")
    bad = None
    for path in reversed(paths):
        try:
            contents = read(path)
        except CheckpointError as e:
            bad = bad or path
            older = [p for p in paths if p < path]
            fallback = older[-1] if older else "nothing older"
            warnings.warn(f"skipping bad checkpoint {path} ({e}); trying {fallback}",
                          stacklevel=2)
            continue
        state, manifest = _fit(path, *contents, like)
        return state, manifest, path
    raise CheckpointError(f"{directory}: every checkpoint is unreadable or corrupt "
                          f"(newest: {bad})")
