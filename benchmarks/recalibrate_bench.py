"""Benchmark `bncli recalibrate` beside `torch.optim.swa_utils.update_bn` (issue 13): whole processes, same model
and data, wall-time medians, ratios and peak RSS; and the accuracy of bncli's statistics against float64.

    python3 benchmarks/recalibrate_bench.py            # 5 conv+BN layers (64 channels), 1024 images 3x48x48, batch 64
    python3 benchmarks/recalibrate_bench.py --quick    # 128 images 3x16x16: seconds

Each command runs as its own process, round robin, --repeat times (default 3): a figure is the median, a ratio the
median of the per-round ratios (the 2-core machine is shared: only ratios taken side by side mean much).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

MODEL = '''
import torch.nn as nn


def five(width=64):
    layers, c = [], 3
    for _ in range(5):
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    return nn.Sequential(*layers)
'''

UPDATE_BN = '''
import sys, torch, bench_model
torch.set_num_threads({threads})
model = bench_model.five()
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
loader = torch.load(sys.argv[2], weights_only=True).split(64)
torch.optim.swa_utils.update_bn(loader, model)
torch.save(model.state_dict(), sys.argv[3])
'''


def run(argv: list[str], cwd: Path) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{cwd}"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv} failed: {err.decode()[-2000:]}")
    return wall, usage.ru_maxrss


def accuracy(work: Path, offset: float) -> tuple[float, float]:
    """bncli's population statistics against the float64 formula over the same BatchNorm inputs: the largest
    |mean - ref| / std and the largest relative error of the variance, over every channel of every layer."""
    import torch

    sys.path.insert(0, str(work))
    import bench_model

    from bncli.recalibrate import batchnorm_modules, population_moments

    torch.manual_seed(0)
    model = bench_model.five()
    x = torch.load(work / "x.pt", weights_only=True) + offset
    batches = list(x.split(64))
    got, _ = population_moments(model, batches)
    # The reference: each batch's BatchNorm input copied to float64, two passes, merged in float64 (Chan):
    # independent of BatchNorm's own statistics, and kept to one batch in memory at a time.
    ref: dict[str, tuple] = {}

    def measure(mod, args, name):
        x64 = args[0].double()
        dims = [0, *range(2, x64.dim())]
        mean = x64.mean(dim=dims)
        m2 = ((x64 - mean.view(1, -1, *[1] * (x64.dim() - 2))) ** 2).sum(dim=dims)
        n = x64.numel() // x64.shape[1]
        if name not in ref:
            ref[name] = (n, mean, m2)
            return
        na, ma, m2a = ref[name]
        delta = mean - ma
        ref[name] = (na + n, ma + delta * n / (na + n), m2a + m2 + delta**2 * na * n / (na + n))

    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: measure(mod, a, n)) for n, m in batchnorm_modules(model)]
    model.eval()
    for _, m in batchnorm_modules(model):
        m.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    worst_mean = worst_var = 0.0
    for name, (n, mean, m2) in ref.items():
        var = m2 / (n - 1)
        worst_mean = max(worst_mean, ((got[name].mean - mean).abs() / var.sqrt()).max().item())
        worst_var = max(worst_var, ((got[name].var - var).abs() / var).max().item())
    return worst_mean, worst_var


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "bench_model.py").write_text(MODEL)
        (work / "update_bn.py").write_text(UPDATE_BN.format(threads=args.threads))
        sys.path.insert(0, str(work))
        import bench_model

        torch.manual_seed(0)
        torch.save(bench_model.five().state_dict(), work / "model.pt")
        n, side = (128, 16) if args.quick else (1024, 48)
        torch.save(torch.randn(n, 3, side, side), work / "x.pt")
        commands = {
            "update_bn": [PY, "update_bn.py", "model.pt", "x.pt", "ub.pt"],
            "bncli": [PY, "-m", "bncli", "recalibrate", "model.pt", "-m", "bench_model:five", "-d", "x.pt", "-b", "64",
                      "-n", str(n), "-o", "bn.pt", "-f", "json"],
        }
        walls: dict[str, list[float]] = {k: [] for k in commands}
        rss: dict[str, int] = dict.fromkeys(commands, 0)
        for _ in range(args.repeat):
            for name, argv in commands.items():
                wall, peak = run(argv, work)
                walls[name].append(wall)
                rss[name] = max(rss[name], peak)
        ratios = [b / a for a, b in zip(walls["update_bn"], walls["bncli"], strict=True)]
        plain, shifted = accuracy(work, 0.0), accuracy(work, 1e4)
    shape = f"{n} images 3x{side}x{side}, batch 64, 5 conv+BN (64 ch)"
    print(f"| what | median s | range s | peak RSS MB | ratio |  ({shape}, {args.repeat} rounds, torch {torch.__version__})")
    print("|---|---:|---:|---:|---:|")
    for name, label in (("update_bn", "torch.optim.swa_utils.update_bn script"), ("bncli", "bncli recalibrate")):
        w = walls[name]
        ratio = "" if name == "update_bn" else f"{statistics.median(ratios):.2f}x time, {rss['bncli'] / rss['update_bn']:.2f}x RSS"
        print(f"| {label} | {statistics.median(w):.2f} | {min(w):.2f}-{max(w):.2f} | {rss[name] / 1024:.0f} | {ratio} |")
    print(f"accuracy vs float64: max |mean - ref| / std {plain[0]:.1e}, max var rel err {plain[1]:.1e}; "
          f"with a mean offset of 1e4: {shifted[0]:.1e}, {shifted[1]:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
