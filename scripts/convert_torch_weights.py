#!/usr/bin/env python
"""Convert a PyTorch (torchvision-layout) checkpoint into a jbp weights checkpoint.

    python scripts/convert_torch_weights.py efficientnet_b0 efficientnet_b0_rwightman.pth out/
    python scripts/convert_torch_weights.py resnet18 resnet18.safetensors out/
    python scripts/train.py --config my.toml --set model.init_from=out/ckpt-000000000.npz
    python scripts/train.py --config my.toml --set model.init_from=out/ckpt-000000000.npz \
        --set 'model.init_fresh=["fc"]'       # ImageNet's weights, a new head of num_classes

INPUT is a ``state_dict`` saved by ``torch.save`` (read with ``torch.load(weights_only=True)``:
no code runs; a dict holding the state_dict under "state_dict" or "model" is unwrapped) or a
``.safetensors`` file (read with ``safetensors.numpy``, no torch needed). The model is one of
``jbp.torch_weights.MODELS``; ``num_classes`` and the input channels come from the file. The
output is ``OUTPUT_DIR/ckpt-000000000.npz``, a :class:`jbp.checkpoint.Weights` (params and
batch-norm state, float32), which ``model.init_from`` loads into a run of the same model,
``num_classes`` and input channels (docs/errors.md lists what a mismatch says), or with
``model.init_fresh = ["fc"]`` into one of other ``num_classes`` (a new classifier head).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file  # noqa: PLC0415
        return load_file(path)
    import torch  # noqa: PLC0415
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj


def main(argv=None) -> str:
    from jbp import checkpoint, torch_weights  # noqa: PLC0415
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=torch_weights.MODELS)
    p.add_argument("input", help="a .pth/.pt state_dict or a .safetensors file")
    p.add_argument("output_dir", help="where to write ckpt-000000000.npz")
    args = p.parse_args(argv)
    params, state = torch_weights.from_torch(args.model, load_state_dict(args.input))
    path = checkpoint.save(args.output_dir, checkpoint.Weights(params, state, 0), keep=1,
                           config=f"# converted from {args.input} ({args.model})")
    n = sum(v.size for v in __import__("jax").tree.leaves(params))
    print(f"{args.model}: {n:,} parameters from {args.input} -> {path}")
    return path


if __name__ == "__main__":
    main()
