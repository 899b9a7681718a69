"""Multiply-adds per image of a CIFAR ResNet, block by block, and of its key network (the
Answer early section's cost arithmetic), counted from the layers' output shapes; no weights.

    python benchmarks/macs.py --model resnet20
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cacheviz.early import architecture  # noqa: E402
from cacheviz.features import list_layers  # noqa: E402
from cacheviz.keynet import KeyNet, default_layer, n_params  # noqa: E402


def macs(net: torch.nn.Module, x: torch.Tensor, group=lambda name: name) -> dict[str, int]:
    """{group of a module's name: multiply-adds} of the convolutions and linear layers for one image."""
    out: dict[str, int] = {}
    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            per_out = (m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                       if isinstance(m, torch.nn.Conv2d) else m.in_features)

            def hook(_m, _i, o, key=group(name), per_out=per_out):
                out[key] = out.get(key, 0) + o[0].numel() * per_out
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        net.eval()(x)
    for h in hooks:
        h.remove()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    a = p.parse_args(argv)
    spec = architecture(a.model)
    if spec is None:
        print(f"error: {a.model} is not a chain of blocks here; use a CIFAR ResNet or digits-cnn", file=sys.stderr)
        return 2
    x = torch.zeros(1, spec.in_channels, *spec.input_size)
    blocks = macs(spec.net, x, lambda n: ".".join(n.split(".")[:2]) if n.startswith("layer") else n)
    total = sum(blocks.values())
    print(f"{a.model}: {total / 1e6:.2f} M multiply-adds per image")
    for k, v in blocks.items():
        print(f"  {k:10} {v / 1e6:6.2f} M  {100 * v / total:5.1f}%")
    layer = default_layer(a.model)
    shape = next(i.shape for i in list_layers(spec) if i.name == layer)
    kn = KeyNet(spec.in_channels, spec.input_size[0], shape)
    print(f"key network for {layer} {tuple(shape)}: {sum(macs(kn, x).values()) / 1e6:.2f} M multiply-adds, "
          f"{n_params(kn):,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
