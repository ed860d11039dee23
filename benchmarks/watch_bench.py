"""The cost of bncli.watch on a training step: a small conv net on the CPU, batch 32 of 3x64x64, every=1.

    PYTHONPATH=. python3 benchmarks/watch_bench.py [--rounds 7] [--steps 20] [--every 1]

Steps with and without the watch alternate in rounds (round robin: the machine's load moves both alike); the
table row gives the median step time of each and the median of the per-round ratios. Not a test: numbers go to
docs/performance.md and docs/watch.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time


def make_model():
    from torch import nn

    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2), *block(128, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def steps(model, opt, x, y, n: int) -> float:
    import torch

    start = time.perf_counter()
    for _ in range(n):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / n


def main(argv=None) -> str:
    import torch

    import bncli

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = make_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
    steps(model, opt, x, y, 3)  # warm-up
    plain, watched, ratios = [], [], []
    for _ in range(args.rounds):
        a = steps(model, opt, x, y, args.steps)
        with bncli.watch(model, opt, on_defect="raise", every=args.every):
            b = steps(model, opt, x, y, args.steps)
        plain.append(a)
        watched.append(b)
        ratios.append(b / a)
    ratio = statistics.median(ratios)
    per_layer = hook_cost(args.rounds)
    row = (f"| watch | conv net, 5 BatchNorm2d, batch 32x3x64x64, SGD, every={args.every} | "
           f"{statistics.median(plain) * 1e3:.1f} ms | {statistics.median(watched) * 1e3:.1f} ms | "
           f"{(ratio - 1) * 100:+.1f}% | <= 3% | torch {torch.__version__}, {torch.get_num_threads()} threads, "
           f"{platform.machine()}, {args.rounds} rounds x {args.steps} steps |")
    layers = sum(1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    row2 = (f"| watch | the watch's own cost per BatchNorm2d(128) forward in train mode, every={args.every} | "
            f"{per_layer * 1e6:.1f} µs x {layers} layers | | {per_layer * layers / statistics.median(plain) * 100:+.2f}% | "
            "<= 3% | 1 thread, the same tiny layer with and without the watch: the load of the machine hardly enters |")
    print("| bench | what | step | step, watched | overhead | target | note |")
    print("|---|---|---:|---:|---:|---|---|")
    print(row)
    print(row2)
    return row + "\n" + row2


def hook_cost(rounds: int, n: int = 2000) -> float:
    """Seconds the watch adds to one forward of a BatchNorm2d(128) on a tiny input (median over rounds)."""
    import torch


    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny layer: OpenMP threads on a loaded machine would only add their noise
    try:
        return _hook_cost(rounds, n)
    finally:
        torch.set_num_threads(threads)


def _hook_cost(rounds: int, n: int) -> float:
    import torch

    import bncli

    bn = torch.nn.BatchNorm2d(128).train()
    model = torch.nn.Sequential(bn)
    x = torch.randn(2, 128, 2, 2)
    costs = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            model(x)
        plain = time.perf_counter() - start
        with bncli.watch(model):
            start = time.perf_counter()
            for _ in range(n):
                model(x)
            watched = time.perf_counter() - start
        costs.append((watched - plain) / n)
    return statistics.median(costs)


if __name__ == "__main__":
    main()
