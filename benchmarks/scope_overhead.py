"""What does ``gf.inference(model)`` cost, next to the hand-written pattern it replaces?

Measured side by side in one run (interleaved samples, medians), on
(a) a 3-layer MLP, (b) a ~180-module tree of 36 Conv-BN-ReLU-Dropout blocks,
(c) a transformers ``BertModel`` from a small config (its class overrides ``train()``,
as every Hugging Face model does), (d) ``nn.TransformerEncoder`` and (e) a
torchvision-style ResNet-18 (written here, torchvision may not be installed):

* scope alone:    ``with gf.inference(model): pass``
  vs hand-written ``model.eval(); with torch.no_grad(): pass; model.train()``
* with a forward: the same around a batch-1 forward pass.

Ratios are of median CPU time per call (all threads of the process), the figure a
loaded shared machine disturbs least; median wall times and their ratio are printed too.

Run: ``.venv/bin/python benchmarks/scope_overhead.py`` (``--quick`` for a smoke run,
``--only c,d`` for some of the models, ``--threads N`` for torch's intra-op threads,
1 by default: the forward's timing is far stabler on a shared machine).
Targets: (b) scope alone <= 0.3x the hand-written flip; (c), (d), (e) scope alone
<= 0.5x; every model with the forward <= 1.02x.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import gradfence as gf


def mlp() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    return model, torch.randn(1, 64)


def conv_tree() -> tuple[nn.Module, torch.Tensor]:
    blocks = [
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1))
        for _ in range(36)
    ]
    return nn.Sequential(*blocks), torch.randn(1, 8, 16, 16)


def bert() -> tuple[nn.Module, torch.Tensor]:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=64,
    )
    return BertModel(config), torch.randint(1, 1000, (1, 32))


def transformer_encoder() -> tuple[nn.Module, torch.Tensor]:
    layer = nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=4), torch.randn(1, 32, 128)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two 3x3 convs with BN, identity or 1x1 shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout: stem, four stages of two basic blocks, pool, fc."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, inplanes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes))
            )
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet() -> tuple[nn.Module, torch.Tensor]:
    return ResNet18(), torch.randn(1, 3, 64, 64)


def per_call_us(fn: Callable[[], None], inner: int) -> tuple[float, float]:
    """Wall time and CPU time (all threads of the process) per call, in microseconds."""
    wall, cpu = time.perf_counter_ns(), time.process_time_ns()
    for _ in range(inner):
        fn()
    return (
        (time.perf_counter_ns() - wall) / inner / 1e3,
        (time.process_time_ns() - cpu) / inner / 1e3,
    )


def compare(
    label: str, hand: Callable[[], None], scoped: Callable[[], None], samples: int, inner: int
) -> float:
    """Print and return the CPU-time ratio scoped / hand-written (wall time printed too).

    CPU time is what a loaded, shared machine disturbs least: waiting for a core counts
    in wall time only.
    """
    for _ in range(max(inner // 4, 1)):  # warm-up
        hand()
        scoped()
    hand_us: list[tuple[float, float]] = []
    scoped_us: list[tuple[float, float]] = []
    for _ in range(samples):  # interleaved, so drift on a shared machine hits both alike
        hand_us.append(per_call_us(hand, inner))
        scoped_us.append(per_call_us(scoped, inner))
    hw, sw = (statistics.median(t[0] for t in times) for times in (hand_us, scoped_us))
    hc, sc = (statistics.median(t[1] for t in times) for times in (hand_us, scoped_us))
    ratio = sc / hc
    print(
        f"  {label:<22} hand-written {hc:9.1f} us   gf.inference {sc:9.1f} us   "
        f"ratio {ratio:.3f} CPU   ({hw:.1f} / {sw:.1f} us, {sw / hw:.3f} wall)"
    )
    return ratio


def run(name: str, build: Callable[[], tuple[nn.Module, torch.Tensor]], quick: bool) -> None:
    torch.manual_seed(0)
    model, x = build()
    model.train()
    count = sum(1 for _ in model.modules())
    print(f"{name} ({count} modules)")
    samples, inner = (5, 20) if quick else (25, 200)

    def hand_flip() -> None:
        model.eval()
        with torch.no_grad():
            pass
        model.train()

    def scoped_flip() -> None:
        with gf.inference(model):
            pass

    def hand_forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()

    def scoped_forward() -> None:
        with gf.inference(model):
            model(x)

    compare("scope alone", hand_flip, scoped_flip, samples, inner)
    with gf.inference(model):  # how long is one forward? size the inner loop on it
        start = time.perf_counter()
        model(x)
        forward_s = time.perf_counter() - start
    forward_inner = max(4, min(inner // 5, int(0.02 / max(forward_s, 1e-6))))
    compare("around batch-1 forward", hand_forward, scoped_forward, samples, forward_inner)


MODELS: dict[str, tuple[str, Callable[[], tuple[nn.Module, torch.Tensor]]]] = {
    "a": ("(a) 3-layer MLP", mlp),
    "b": ("(b) 36 Conv-BN-ReLU-Dropout blocks", conv_tree),
    "c": ("(c) transformers BertModel, 4 layers, hidden 128, 32 tokens", bert),
    "d": ("(d) nn.TransformerEncoder, 4 layers, d_model 128, 32 tokens", transformer_encoder),
    "e": ("(e) ResNet-18 (torchvision layout), 64x64 image", resnet),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke run")
    parser.add_argument("--only", default="a,b,c,d,e", help="models to run, e.g. c,d,e")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: stabler)"
    )
    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads: give a positive number")
    torch.set_num_threads(args.threads)
    chosen = [key.strip() for key in args.only.split(",") if key.strip()]
    unknown = [key for key in chosen if key not in MODELS]
    if unknown:
        parser.error(f"--only: unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"load average {load:.2f}"
    )
    for key in chosen:
        name, build = MODELS[key]
        run(name, build, args.quick)


if __name__ == "__main__":
    main()
