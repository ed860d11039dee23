"""Benchmark bncli against its baselines (issue 5 targets): wall-time medians, ratios and peak RSS, side by side.

    python3 benchmarks/bench.py            # full run: ~4 GB checkpoints, (256, 256, 56, 56) tensor; a few minutes
    python3 benchmarks/bench.py --quick    # small sizes, seconds (the test suite runs this)

Inputs are generated in a temporary folder (or --workdir, kept for reuse). Every command runs as its own process,
round robin, --repeat times; a figure is the median, a ratio is the median of the per-round ratios (this 2-core
machine is noisy and other jobs share it: only ratios taken side by side mean much). Peak RSS comes from
os.wait4's rusage of each child. Files are read from the page cache (they were just written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Each driver runs in a fresh interpreter, so startup (imports) is part of every figure, as for a CLI user.


def run(argv: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KB) and stdout of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):  # 1: bncli found something, which is fine here
        raise RuntimeError(f"{argv} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return wall, usage.ru_maxrss, out.decode()


def bench(commands: dict[str, list[str]], repeat: int) -> dict[str, dict]:
    """Run the commands round robin; per command: wall times, peak RSS and the last stdout."""
    results = {name: {"walls": [], "rss": 0, "out": ""} for name in commands}
    for _ in range(repeat):
        for name, argv in commands.items():
            env = None
            if isinstance(argv, tuple):  # (argv, extra environment variables)
                argv, extra = argv
                env = {**os.environ, **extra}
            wall, rss, out = run(argv, env)
            r = results[name]
            r["walls"].append(wall)
            r["rss"] = max(r["rss"], rss)
            r["out"] = out
    return results


def median(r: dict) -> float:
    return statistics.median(r["walls"])


def ratio(a: dict, b: dict) -> float:
    return statistics.median(x / y for x, y in zip(a["walls"], b["walls"], strict=True))


# --------------------------------------------------------------------------- inputs


def resnet_state(total_bytes: int, layers: int = 53):
    """A ResNet-50-like state dict: `layers` conv+BN pairs, conv weights sized so the whole is ~total_bytes.

    The number of BatchNorm layers and their channels do not depend on total_bytes: only the conv weights
    grow, so a time that grows with the file size means bytes other than BatchNorm's were read.
    """
    from collections import OrderedDict

    import torch

    widths = [64, 128, 256, 512, 1024, 2048]
    chans = [widths[min(i * len(widths) // layers, len(widths) - 1)] for i in range(layers)]
    per_layer = total_bytes // layers
    g = torch.Generator().manual_seed(0)
    sd = OrderedDict()
    for i, c in enumerate(chans):
        c_in = max(1, per_layer // (c * 9 * 4))
        sd[f"layer{i}.conv.weight"] = torch.zeros(c, c_in, 3, 3)
        sd[f"layer{i}.bn.weight"] = torch.rand(c, generator=g) + 0.5
        sd[f"layer{i}.bn.bias"] = torch.randn(c, generator=g) * 0.1
        sd[f"layer{i}.bn.running_mean"] = torch.randn(c, generator=g)
        sd[f"layer{i}.bn.running_var"] = torch.rand(c, generator=g) + 0.5
        sd[f"layer{i}.bn.num_batches_tracked"] = torch.tensor(1000)
    sd["fc.weight"] = torch.zeros(1000, chans[-1])
    return sd


def make_inputs(work: Path, quick: bool) -> dict[str, Path]:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    sizes = {"small": 10 << 20, "big": 40 << 20} if quick else {"small": 100 << 20, "big": 4000 << 20}
    paths = {}
    for name, size in sizes.items():
        pt, st = work / f"{name}.pt", work / f"{name}.safetensors"
        if not (pt.exists() and st.exists()):
            sd = resnet_state(size)
            torch.save(sd, pt)
            save_file(dict(sd), st)
            del sd
        paths[f"{name}.pt"], paths[f"{name}.safetensors"] = pt, st
    many = work / "many"
    count = 20 if quick else 200
    if not many.exists() or len(list(many.glob("*.pt"))) != count:
        shutil.rmtree(many, ignore_errors=True)
        many.mkdir()
        for i in range(count):
            torch.save(resnet_state(200_000, layers=20), many / f"ckpt{i:03d}.pt")
    paths["many"] = many
    tiny = work / "tiny.safetensors"  # one ResNet-like layer: only startup and the CLI layer are left to measure
    if not tiny.exists():
        save_file(dict(resnet_state(1 << 16, layers=1)), tiny)
    paths["tiny.safetensors"] = tiny
    layers150 = work / "layers150.pt"  # issue 11: a table of 150 layers against the same report as JSON
    if not layers150.exists():
        torch.save(resnet_state(4 << 20, layers=150), layers150)
    paths["layers150.pt"] = layers150
    shape = (16, 32, 28, 28) if quick else (256, 256, 56, 56)
    tensor = work / ("tensor_quick.npy" if quick else "tensor.npy")
    if not tensor.exists():
        np.save(tensor, torch.randn(shape, generator=torch.Generator().manual_seed(0)).mul_(2).add_(3).numpy())
    paths["tensor"] = tensor
    return paths


# --------------------------------------------------------------------------- drivers (run in child processes)

BNCLI = [PY, "-m", "bncli"]


def imports_after(argv: list[str], modules: tuple[str, ...] = ("torch", "numpy", "safetensors")) -> dict:
    """Which heavy modules a bncli invocation imported, run in-process in a child."""
    code = (
        "import json, sys\n"
        f"sys.argv = {['bncli', *argv]!r}\n"
        "from bncli.cli import main\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main()\n    except SystemExit:\n        pass\n"
        f"print(json.dumps({{m: m in sys.modules for m in {modules!r}}}))\n"
    )
    return json.loads(run([PY, "-c", code])[2])


def bytes_read_by_inspect(path: Path) -> int:
    """Storage bytes bncli's torch-free zip reader read while inspecting `path` (its one read function, counted)."""
    code = (
        "import sys\n"
        "import bncli.formats.torch_zip as tz\n"
        "total = [0]\n"
        "orig = tz._read_at\n"
        "def counted(p, off, n):\n    total[0] += n\n    return orig(p, off, n)\n"
        "tz._read_at = counted\n"
        "from bncli.audit import inspect_file\n"
        f"inspect_file({str(path)!r})\n"
        "print(total[0])\n"
    )
    return int(run([PY, "-c", code])[2])


def many_driver(folder: Path, how: str) -> list[str]:
    if how == "bncli":  # the real CLI: one process, the folder expanded by bncli itself
        return [PY, "-m", "bncli", "inspect", str(folder), "--format", "json", "--fail-on", "never"]
    else:  # the bare safe load: torch.load(weights_only=True, mmap=True), touching only BatchNorm tensors
        body = (
            "import torch\n"
            "for p in files:\n"
            "    sd = torch.load(p, map_location='cpu', weights_only=True, mmap=True)\n"
            "    [v.clone() for k, v in sd.items() if '.bn.' in k]\n"
        )
    return [PY, "-c", f"import glob\nfiles = sorted(glob.glob({str(folder / '*.pt')!r}))\n{body}"]


NORMALIZE_DRIVER = r"""
import json, statistics, sys, time
import numpy as np
import torch
import torch.nn.functional as F
from bncli.normalize import apply_and_measure, build_layer

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

path, repeat = sys.argv[1], int(sys.argv[2])
base = rss_kb("VmRSS")
x = torch.from_numpy(np.load(path))
c = x.shape[1]
out = {"shape": list(x.shape), "bytes": x.numel() * x.element_size()}
ref64 = {}
for mode in ("train", "eval"):
    times = {"bare": [], "bncli": []}
    for _ in range(repeat):
        rm, rv = torch.zeros(c), torch.ones(c)
        t = time.perf_counter(); F.batch_norm(x, rm, rv, torch.ones(c), torch.zeros(c), mode == "train", 0.1, 1e-5)
        times["bare"].append(time.perf_counter() - t)
        bn = build_layer(c, eps=1e-5, momentum=0.1, affine=True).train(mode == "train")
        with torch.no_grad():
            t = time.perf_counter(); y, xs, ys = apply_and_measure(bn, x)
            times["bncli"].append(time.perf_counter() - t)
        del y
    ref = torch.nn.BatchNorm2d(c).train(mode == "train")
    with torch.no_grad():
        yr = ref(x)
        bn = build_layer(c, eps=1e-5, momentum=0.1, affine=True).train(mode == "train")
        y, xs, ys = apply_and_measure(bn, x)
    err_out = float((y - yr).abs().max())
    # float64 reference, channel by channel; the mean's error is taken relative to max(|mean|, std)
    rel = 0.0
    for t, (mean, std) in ((x, xs), (y, ys)):
        for ch in range(c):
            v = t[:, ch].double()
            m, s = v.mean().item(), v.std().item()
            rel = max(rel, abs(mean[ch] - m) / max(abs(m), s), abs(std[ch] - s) / s)
    del y, yr, t, v  # t and v still point at y and a channel of it
    out[mode] = {
        "bare_ms": statistics.median(times["bare"]) * 1e3,
        "bncli_ms": statistics.median(times["bncli"]) * 1e3,
        "ratio": statistics.median(b / a for a, b in zip(times["bare"], times["bncli"])),
        "max_abs_diff_vs_BatchNorm2d": err_out,
        "stats_max_rel_err_vs_float64": rel,
    }
# peak memory of one compute, counted from before the input existed: input + output + scratch
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
bn = build_layer(c, eps=1e-5, momentum=0.1, affine=True).train(True)
with torch.no_grad():
    y, xs, ys = apply_and_measure(bn, x)
out["peak_extra_kb"] = rss_kb("VmHWM") - base
print(json.dumps(out))
"""


# --------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--repeat", type=int, default=None, help="rounds per group (default 3 quick, 5 full)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep generated inputs here and reuse them")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 5)
    if args.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="bncli-bench-"))
        cleanup = True
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
        cleanup = False
    need = (1 << 30) if args.quick else (10 << 30)
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"bench: {work} has {free >> 20} MB free; the inputs need about {need >> 20} MB", file=sys.stderr)
        return 2
    try:
        rows = run_all(work, args.quick, repeat)
    finally:
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)
    print(render(rows, args.quick, repeat))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def run_all(work: Path, quick: bool, repeat: int) -> list[dict]:
    t0 = time.perf_counter()
    # generated in a child: a parent that imported torch would inflate every child's ru_maxrss (fork copies it)
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench, json, pathlib; "
    code += f"print(json.dumps({{k: str(v) for k, v in bench.make_inputs(pathlib.Path({str(work)!r}), {quick!r}).items()}}))"
    paths = {k: Path(v) for k, v in json.loads(run([PY, "-c", code])[2]).items()}
    print(f"bench: inputs ready in {time.perf_counter() - t0:.1f} s under {work}", file=sys.stderr)
    rows: list[dict] = []

    def row(target, what, r=None, base=None, goal="", note=""):
        rows.append(
            {
                "target": target,
                "what": what,
                "ms": None if r is None else median(r) * 1e3,
                "rss_mb": None if r is None else r["rss"] / 1024,
                "ratio": None if base is None else ratio(r, base),
                "goal": goal,
                "note": note,
            }
        )

    # 1. startup
    r = bench(
        {
            "typer": [PY, "-c", "import typer"],
            "help": [*BNCLI, "--help"],
            "version": [*BNCLI, "--version"],
            "inspect_help": [*BNCLI, "inspect", "--help"],
            "typer_rich": [PY, "-c", "import typer, typer.rich_utils"],
            "typer_pydantic": [PY, "-c", "import typer, pydantic"],
        },
        repeat * 2,
    )
    heavy = {a: imports_after(a.split()) for a in ("--help", "--version", "inspect --help")}
    row(1, 'python -c "import typer"', r["typer"])
    for key, arg in (("help", "--help"), ("version", "--version"), ("inspect_help", "inspect --help")):
        loaded = [m for m, v in heavy[arg].items() if v]
        row(1, f"bncli {arg}", r[key], r["typer"], "<= 2x", "imports " + (", ".join(loaded) or "no torch/numpy/safetensors"))
    row(1, '  python -c "import typer, typer.rich_utils"', r["typer_rich"], r["typer"], note="typer's Rich help, not imported")
    row(1, '  python -c "import typer, pydantic"', r["typer_pydantic"], r["typer"], note="typer 0.29's coercion, not imported")

    # 6. startup against `import typer, numpy` (issue 14): typer 0.29's pydantic coercion replaced (bncli/clistyle.py)
    tiny = paths["tiny.safetensors"]
    r = bench(
        {
            "tn": [PY, "-c", "import typer, numpy"],
            "help": [*BNCLI, "--help"],
            "inspect": [*BNCLI, "inspect", str(tiny), "--format", "json"],
        },
        repeat * 2,
    )
    pyd = imports_after(["inspect", str(tiny), "--format", "json"], ("pydantic", "torch"))
    loaded = ", ".join(m for m, v in pyd.items() if v) or "no pydantic, no torch"
    row(6, 'python -c "import typer, numpy"', r["tn"])
    row(6, "bncli --help / import typer, numpy", r["help"], r["tn"], "<= 1.5x")
    row(6, "bncli inspect tiny.safetensors --format json", r["inspect"], r["tn"], "<= 2x", "imports " + loaded)

    # 2. safetensors
    big, small = paths["big.safetensors"], paths["small.safetensors"]
    r = bench(
        {
            "tn": [PY, "-c", "import typer, numpy"],
            "big": [*BNCLI, "inspect", str(big)],
            "small": [*BNCLI, "inspect", str(small)],
        },
        repeat,
    )
    torch_st = imports_after(["inspect", str(big)])["torch"]
    gb = big.stat().st_size / 1e9
    row(2, 'python -c "import typer, numpy"', r["tn"])
    row(2, f"bncli inspect big.safetensors ({gb:.2f} GB)", r["big"], r["tn"], "<= 3x, < 80 MB", f"torch imported: {torch_st}")
    row(2, f"bncli inspect small.safetensors ({small.stat().st_size / 1e6:.0f} MB)", r["small"], r["tn"])
    row(2, "  big / small", r["big"], r["small"], "<= 1.2x")

    # 3. torch zip
    big, small = paths["big.pt"], paths["small.pt"]
    full_load = (
        "import torch, sys\n"
        "sd = torch.load(sys.argv[1], map_location='cpu', weights_only=True)\n"
        "[v.clone() for k, v in sd.items() if '.bn.' in k]\n"
    )
    mmap_load = full_load.replace("weights_only=True)", "weights_only=True, mmap=True)")
    cmds = {
        "torch": [PY, "-c", "import torch"],
        "tn": [PY, "-c", "import typer, numpy"],
        "big": [*BNCLI, "inspect", str(big)],
        "small": [*BNCLI, "inspect", str(small)],
        "mmap": [PY, "-c", mmap_load, str(big)],
    }
    r = bench(cmds, repeat)
    r_full = bench({"full": [PY, "-c", full_load, str(big)]}, 1 if not quick else repeat)
    torch_pt = imports_after(["inspect", str(big)])["torch"]
    read = bytes_read_by_inspect(big)
    gb = big.stat().st_size / 1e9
    row(3, 'python -c "import torch"', r["torch"])
    full_note = "" if quick else "1 run"
    row(3, f"torch.load(big.pt) whole, BN tensors cloned ({gb:.2f} GB)", r_full["full"], note=full_note)
    row(3, "torch.load(big.pt, mmap=True), BN tensors only", r["mmap"], r["torch"])
    row(
        3,
        f"bncli inspect big.pt ({gb:.2f} GB)",
        r["big"],
        r["torch"],
        "<= 1.2x torch, < 300 MB",
        f"torch imported: {torch_pt}; storage bytes read: {read / 1e6:.2f} MB",
    )
    row(3, "  big.pt / import typer, numpy", r["big"], r["tn"], "stretch <= 3x")
    row(3, "  big.pt / small.pt", r["big"], r["small"], "<= 1.2x")

    # 4. many small files in one process
    many = paths["many"]
    n = len(list(many.glob("*.pt")))
    r = bench({"bare": many_driver(many, "torch"), "bncli": many_driver(many, "bncli")}, repeat)
    row(4, f"{n} x torch.load(weights_only, mmap) in one process", r["bare"])
    row(4, f"bncli inspect many/ ({n} files, one process)", r["bncli"], r["bare"], "<= 1.3x", "the CLI, JSON output")

    # 7. the table against JSON for one 150-layer file (issue 11): one layout pass, no re-measuring per row
    layers150 = paths["layers150.pt"]
    r = bench(
        {
            "json": [*BNCLI, "inspect", str(layers150), "--format", "json"],
            "table": ([*BNCLI, "inspect", str(layers150)], {"COLUMNS": "200"}),
            "table80": ([*BNCLI, "inspect", str(layers150)], {"COLUMNS": "80"}),
        },
        repeat * 2,
    )
    row(7, "bncli inspect layers150.pt --format json (150 layers)", r["json"])
    row(7, "bncli inspect layers150.pt, table at 200 columns", r["table"], r["json"], "<= 1.2x")
    row(7, "bncli inspect layers150.pt, table at 80 columns", r["table80"], r["json"], "<= 1.2x",
        "columns dropped to fit")

    # 5. normalize compute
    wall, rss, out = run([PY, "-c", NORMALIZE_DRIVER, str(paths["tensor"]), str(repeat)])
    res = json.loads(out)
    size = res["bytes"] / 1e6
    for mode in ("train", "eval"):
        m = res[mode]
        rows.append(
            {"target": 5, "what": f"F.batch_norm {mode} {tuple(res['shape'])} ({size:.0f} MB)", "ms": m["bare_ms"],
             "rss_mb": None, "ratio": None, "goal": "", "note": ""}
        )
        rows.append(
            {"target": 5, "what": f"bncli normalize compute, {mode}", "ms": m["bncli_ms"], "rss_mb": None,
             "ratio": m["ratio"], "goal": "<= 1.5x",
             "note": f"max |y - BatchNorm2d| {m['max_abs_diff_vs_BatchNorm2d']:.1e}; "
             f"stats rel err {m['stats_max_rel_err_vs_float64']:.1e}"}
        )
    cli = bench({"cli": [*BNCLI, "normalize", str(paths["tensor"]), "--format", "json"]}, 1)["cli"]
    extra = res["peak_extra_kb"] / 1024
    rows.append(
        {"target": 5, "what": "peak memory of one compute (input + output + scratch)", "ms": None, "rss_mb": extra,
         "ratio": extra / (2 * size / 1.048576), "goal": "<= 1.1x (input + output)", "note": f"input {size:.0f} MB"}
    )
    rows.append(
        {"target": 5, "what": "bncli normalize tensor.npy, whole process (train, 1 run)", "ms": median(cli) * 1e3,
         "rss_mb": cli["rss"] / 1024, "ratio": None, "goal": "",
         "note": "includes import torch and reading the .npy: compare with import torch's RSS + input + output"}
    )
    return rows


def render(rows: list[dict], quick: bool, repeat: int) -> str:
    import platform

    lines = [
        f"bncli benchmark ({'quick' if quick else 'full'}, {repeat} rounds, medians) "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {_torch_version()}, load average {os.getloadavg()[0]:.1f}",
        "",
        "| # | what | median ms | peak RSS MB | ratio | target | note |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ms = "" if r["ms"] is None else f"{r['ms']:.0f}"
        rss = "" if r["rss_mb"] is None else f"{r['rss_mb']:.0f}"
        rat = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['target']} | {r['what']} | {ms} | {rss} | {rat} | {r['goal']} | {r['note']} |")
    return "\n".join(lines)


def _torch_version() -> str:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    sys.exit(main())
