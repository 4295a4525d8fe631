"""PyTorch weights in and out: torchvision ``state_dict`` <-> jbp ``(params, state)``.

    params, state = jbp.torch_weights.from_torch("resnet18", torch.load(path, weights_only=True))
    state_dict = jbp.torch_weights.to_torch("resnet18", params, state)   # numpy arrays
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})

For ``resnet18``, ``mobilenet_v2`` and ``efficientnet_b0``, whose jbp models are torchvision's
architectures (:mod:`jbp.models.resnet`, :mod:`jbp.models.mobilenet`). The values may be torch
tensors (anything with ``.detach().cpu().numpy()``: torch is not imported here) or numpy arrays
(``safetensors.numpy.load_file``). What changes on the way:

- convolution kernels: PyTorch ``(C_out, C_in/groups, KH, KW)`` <-> HWIO ``(KH, KW, C_in/groups,
  C_out)`` (``w.transpose(2, 3, 1, 0)``);
- fully connected weights ``(out, in)`` <-> ``(in, out)``; squeeze-and-excitation's 1×1
  convolutions ``(out, in, 1, 1)`` <-> ``dense`` weights ``(in, out)``;
- batch norm: ``weight``/``bias`` are ``γ``/``β`` (params), ``running_mean``/``running_var`` the
  state; ``num_batches_tracked`` is accepted and dropped (PyTorch reads it only with
  ``momentum=None``), and :func:`to_torch` writes it as 0.

``num_classes`` and the input channels are read from the classifier's and the stem's shapes. A
missing, unexpected or mis-shaped entry is a ``ValueError`` naming the key; a ``state_dict`` of
another of these models is recognised and named.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jbp.models import get_model
from jbp.models import mobilenet as _mobilenet
from jbp.models import resnet as _resnet

#: The models with a torchvision layout.
MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0")

# One entry per torchvision module: (torch prefix, kind, jbp path); kind "conv", "bn", "fc"
# (a Linear) or "fc1x1" (a 1×1 Conv2d with bias that jbp runs as a dense layer). A jbp path is
# a tuple of keys into params (and, for "bn", the same keys into state).
Entry = Tuple[str, str, tuple]


def _resnet18_layout() -> Iterator[Entry]:
    yield "conv1", "conv", ("stem",)
    yield "bn1", "bn", ("stem_bn",)
    spec = _resnet.RESNET18
    cin, i = spec.widths[0], 0
    for stage, cout in enumerate(spec.widths):
        for j in range(spec.blocks):
            stride = spec.block_strides[i]
            prefix = f"layer{stage + 1}.{j}"
            for name in ("conv1", "bn1", "conv2", "bn2"):
                yield (f"{prefix}.{name}", "bn" if name.startswith("bn") else "conv",
                       ("blocks", i, name))
            if stride != 1 or cin != cout:
                yield f"{prefix}.downsample.0", "conv", ("blocks", i, "proj")
                yield f"{prefix}.downsample.1", "bn", ("blocks", i, "proj_bn")
            cin, i = cout, i + 1
    yield "fc", "fc", ("fc",)


def _mobilenet_layout(spec: _mobilenet.Spec) -> Iterator[Entry]:
    """torchvision's module names: MobileNetV2's ``features.{i}.conv.{…}`` (InvertedResidual),
    EfficientNet's ``features.{stage}.{j}.block.{…}`` (MBConv)."""
    yield "features.0.0", "conv", ("stem",)
    yield "features.0.1", "bn", ("stem_bn",)
    blocks = spec.blocks()
    positions = [(s + 1, j) for s, (*_, n) in enumerate(spec.stages) for j in range(n)]
    for i, (b, (stage, j)) in enumerate(zip(blocks, positions)):
        parts: List[Tuple[str, tuple]] = []       # (torch sub-prefix, kind/name) in order
        if spec.name == "mobilenet_v2":
            base = f"features.{i + 1}.conv"
            k = 0
            if b.expand != 1:
                parts += [(f"{k}.0", ("conv", "expand")), (f"{k}.1", ("bn", "expand_bn"))]
                k += 1
            parts += [(f"{k}.0", ("conv", "depthwise")), (f"{k}.1", ("bn", "depthwise_bn")),
                      (f"{k + 1}", ("conv", "project")), (f"{k + 2}", ("bn", "project_bn"))]
        else:
            base = f"features.{stage}.{j}.block"
            k = 0
            if b.expand != 1:
                parts += [(f"{k}.0", ("conv", "expand")), (f"{k}.1", ("bn", "expand_bn"))]
                k += 1
            parts += [(f"{k}.0", ("conv", "depthwise")), (f"{k}.1", ("bn", "depthwise_bn")),
                      (f"{k + 1}.fc1", ("fc1x1", "se", "fc1")),
                      (f"{k + 1}.fc2", ("fc1x1", "se", "fc2")),
                      (f"{k + 2}.0", ("conv", "project")), (f"{k + 2}.1", ("bn", "project_bn"))]
        for sub, (kind, *path) in parts:
            yield f"{base}.{sub}", kind, ("blocks", i, *path)
    head = 1 + len(spec.stages) if spec.name == "efficientnet_b0" else 1 + len(blocks)
    yield f"features.{head}.0", "conv", ("head",)
    yield f"features.{head}.1", "bn", ("head_bn",)
    yield "classifier.1", "fc", ("fc",)


def layout(model_name: str) -> List[Entry]:
    """Every torchvision module of ``model_name`` with its kind and jbp path, in order."""
    if model_name not in MODELS:
        raise ValueError(f"model_name: expected one of {MODELS}, got {model_name!r}")
    if model_name == "resnet18":
        return list(_resnet18_layout())
    spec = _mobilenet.MOBILENET_V2 if model_name == "mobilenet_v2" else _mobilenet.EFFICIENTNET_B0
    return list(_mobilenet_layout(spec))


_SUFFIXES = {"conv": ("weight",), "fc": ("weight", "bias"), "fc1x1": ("weight", "bias"),
             "bn": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def torch_keys(model_name: str) -> List[str]:
    """The keys of ``model_name``'s torchvision ``state_dict``, in its order."""
    return [f"{prefix}.{s}" for prefix, kind, _ in layout(model_name) for s in _SUFFIXES[kind]]


def _to_numpy(value, key: str) -> np.ndarray:
    if hasattr(value, "detach"):                       # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as e:
        raise TypeError(f"state_dict[{key!r}]: expected a tensor or array, got "
                        f"{type(value).__name__}") from e


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def _like_other_model(keys, model_name: str) -> str:
    """`` (it looks like a <other> state_dict)`` when the keys fit another model better."""
    keys = set(keys)
    scores = {m: len(keys & set(torch_keys(m))) / max(1, len(keys)) for m in MODELS}
    best = max(scores, key=scores.get)
    if best != model_name and scores[best] > scores[model_name] and scores[best] > 0.9:
        return f"; it looks like a state_dict of {best}, not {model_name}"
    return ""


def from_torch(model_name: str, state_dict: Mapping, *, dtype=jnp.float32):
    """A torchvision ``state_dict`` of ``model_name`` -> jbp ``(params, state)`` (``dtype``
    arrays; ``np.float64`` needs ``jax_enable_x64``). Raises ``ValueError`` naming a missing,
    unexpected or mis-shaped key (module docstring)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping of names to tensors/arrays, got "
                        f"{type(state_dict).__name__}")
    entries = layout(model_name)
    expected = torch_keys(model_name)
    other = _like_other_model(state_dict.keys(), model_name)
    unexpected = [k for k in state_dict if k not in set(expected)]
    if unexpected:
        raise ValueError(f"state_dict: unexpected key {unexpected[0]!r} for {model_name} "
                         f"({len(unexpected)} unexpected in all){other}")
    missing = [k for k in expected if k not in state_dict
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"state_dict: missing key {missing[0]!r} for {model_name} "
                         f"({len(missing)} missing in all){other}")
    stem_key, fc_key = expected[0], [k for k in expected if k.endswith(".weight")][-1]
    stem, fc = _to_numpy(state_dict[stem_key], stem_key), _to_numpy(state_dict[fc_key], fc_key)
    if stem.ndim != 4 or fc.ndim != 2:
        raise ValueError(f"state_dict: {stem_key!r} should be a 4-d kernel and {fc_key!r} a "
                         f"2-d weight, got shapes {stem.shape} and {fc.shape}")
    num_classes, channels = fc.shape[0], stem.shape[1]
    size = 32
    params, state = jax.eval_shape(lambda: get_model(model_name).init(
        jax.random.key(0), (size, size, channels), num_classes))
    params, state = _mutable(params), _mutable(state)

    def put(tree, path, key, value, want):
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(f"state_dict[{key!r}]: has shape {tuple(value.shape)}, "
                             f"{model_name} expects {tuple(want.shape)}")
        _set(tree, path, jnp.asarray(value, dtype))

    for prefix, kind, path in entries:
        if kind == "bn":
            for suffix, tree, leaf in (("weight", params, "gamma"), ("bias", params, "beta"),
                                       ("running_mean", state, "mean"),
                                       ("running_var", state, "var")):
                key = f"{prefix}.{suffix}"
                value = _to_numpy(state_dict[key], key)
                put(tree, path + (leaf,), key, value, _get(tree, path + (leaf,)))
            continue
        key = f"{prefix}.weight"
        w = _to_numpy(state_dict[key], key)
        want = _get(params, path + ("w",))
        if kind == "conv":
            jbp_w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w
        elif kind == "fc1x1":
            jbp_w = w.reshape(w.shape[:2]).T if w.ndim == 4 and w.shape[2:] == (1, 1) else w
        else:
            jbp_w = w.T if w.ndim == 2 else w
        if tuple(jbp_w.shape) != tuple(want.shape):
            raise ValueError(f"state_dict[{key!r}]: has shape {tuple(w.shape)}, {model_name} "
                             f"expects {_torch_shape(kind, want.shape)}")
        _set(params, path + ("w",), jnp.asarray(jbp_w, dtype))
        if kind in ("fc", "fc1x1"):
            key = f"{prefix}.bias"
            b = _to_numpy(state_dict[key], key)
            want = _get(params, path + ("b",))
            if tuple(b.shape) != tuple(want.shape):
                raise ValueError(f"state_dict[{key!r}]: has shape {tuple(b.shape)}, "
                                 f"{model_name} expects {tuple(want.shape)}")
            _set(params, path + ("b",), jnp.asarray(b, dtype))
    return params, state


def _torch_shape(kind, jbp_shape) -> tuple:
    if kind == "conv" and len(jbp_shape) == 4:
        kh, kw, i, o = jbp_shape
        return (o, i, kh, kw)
    if kind == "fc1x1":
        return (jbp_shape[1], jbp_shape[0], 1, 1) if len(jbp_shape) == 2 else tuple(jbp_shape)
    if kind == "fc" and len(jbp_shape) == 2:
        return (jbp_shape[1], jbp_shape[0])
    return tuple(jbp_shape)


def _mutable(tree):
    """Nested dicts and lists of a (shape-only) params/state tree, to fill in place."""
    if isinstance(tree, dict):
        return {k: _mutable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_mutable(v) for v in tree]
    return tree


def to_torch(model_name: str, params, state) -> Dict[str, np.ndarray]:
    """jbp ``(params, state)`` of ``model_name`` -> its torchvision ``state_dict`` as numpy
    arrays (``torch.from_numpy`` each for ``load_state_dict``)."""
    out: Dict[str, np.ndarray] = {}
    try:
        for prefix, kind, path in layout(model_name):
            if kind == "bn":
                p, s = _get(params, path), _get(state, path)
                out[f"{prefix}.weight"] = np.asarray(p["gamma"])
                out[f"{prefix}.bias"] = np.asarray(p["beta"])
                out[f"{prefix}.running_mean"] = np.asarray(s["mean"])
                out[f"{prefix}.running_var"] = np.asarray(s["var"])
                out[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)
                continue
            p = _get(params, path)
            w = np.asarray(p["w"])
            if kind == "conv":
                out[f"{prefix}.weight"] = w.transpose(3, 2, 0, 1)
            elif kind == "fc1x1":
                out[f"{prefix}.weight"] = w.T[:, :, None, None]
            else:
                out[f"{prefix}.weight"] = w.T
            if kind in ("fc", "fc1x1"):
                out[f"{prefix}.bias"] = np.asarray(p["b"])
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"params/state: not a {model_name} parameter tree (no "
                         f"{'/'.join(map(str, path))}: {type(e).__name__} {e})") from e
    return {k: np.array(v, order="C") for k, v in out.items()}      # writable (torch.from_numpy)
