"""The `recalibrate` core: re-estimate every BatchNorm layer's running statistics exactly, on one process or many."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bncli.errors import ExitCode, InputError, RankError, first_line

if TYPE_CHECKING:
    import torch

    from bncli.diff import DiffReport


@dataclass(frozen=True)
class CheckResult:
    """--check: the thresholds, and the layers whose stored statistics the data does not fit (worst first)."""

    max_shift: float
    max_var_ratio: float
    failed: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class RecalibrateReport:
    checkpoint: str
    output: str | None  # None with --check: nothing is written
    model: str
    device: str
    world_size: int
    samples: int | None  # samples used (None: a --loader batch whose size bncli cannot tell)
    available: int | None  # samples in the --data files (None with --loader)
    batches: int
    batch_size: int | None  # None with --loader
    unused: tuple[str, ...]  # BatchNorm layers that saw no input: left as they were
    diff: DiffReport  # before (A) and after (B); with --check, stored (A) and measured (B), ranked by drift
    loader: str | None = None  # --loader MODULE:FN
    check: CheckResult | None = None


@dataclass
class Moments:
    """Per-channel count, mean and M2 (sum of squared deviations) in float64."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def var(self) -> torch.Tensor:
        """Unbiased (correction=1) variance, as BatchNorm stores in running_var."""
        return self.m2 / (self.count - 1)


def merge(a: Moments | None, b: Moments) -> Moments:
    """Chan et al.'s parallel update: exact for any split of the data, and stable (no sum of squares)."""
    if a is None or a.count == 0:
        return b
    if b.count == 0:
        return a
    n = a.count + b.count
    delta = b.mean - a.mean
    return Moments(n, a.mean + delta * (b.count / n), a.m2 + b.m2 + delta * delta * (a.count * b.count / n))


def batch_moments(x: torch.Tensor) -> Moments:
    """Moments of one BatchNorm input (N, C, *) over every dimension but C, computed in float64."""
    import torch

    dims = [0, *range(2, x.dim())]
    x64 = x.detach().to(torch.float64)
    mean = x64.mean(dim=dims)
    # Two passes over the batch (mean, then squared deviations): no cancellation, and no transposed copy.
    m2 = ((x64 - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2).sum(dim=dims)
    return Moments(x.numel() // x.shape[1], mean, m2)


def batchnorm_modules(model) -> list[tuple[str, Any]]:
    """The BatchNorm layers that keep running statistics (track_running_stats=False ones have none to update)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def select_modules(model, layers: Iterable[str] | str | None = None, option: str = "--layers") -> list[tuple[str, Any]]:
    """The BatchNorm modules to re-estimate: all of them, or those whose names match one of the globs in `layers`.
    A glob that matches none is an input error naming the layers there are (a typo must not pass silently)."""
    import fnmatch

    found = batchnorm_modules(model)
    if layers is None:
        return found
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        return found
    names = [n for n, _ in found]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise InputError(f"{option} {pattern!r} matches no BatchNorm layer of the model" + (f"; layers: {shown}" if names else ""))
    return [(n, m) for n, m in found if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def default_forward(model, batch, device=None, dtype=None) -> None:
    """`model(batch)`, or `model(batch[0])` for a tuple or list (an (inputs, targets) pair); tensors are moved to
    the model's device and floating dtype first. Other batches (dicts, custom objects) need a forward function."""
    import torch

    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"a batch of type {type(batch).__name__} is not a tensor or a tuple starting with one; say how it reaches "
            "the model with a forward function (--forward MODULE:FN, forward(model, batch))"
        )
    if device is not None or dtype is not None:
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
    run_model(model, x)


# How many population_moments passes run now: bncli.watch takes their updates for a recalibration (no BN018).
ACTIVE = [0]


def population_moments(
    model,
    batches: Iterable[Any],
    device: str = "cpu",
    on_batch: Callable[[], None] | None = None,
    *,
    forward: Callable[[Any, Any], Any] | None = None,
    layers: list[tuple[str, Any]] | None = None,
) -> tuple[dict[str, Moments], int]:
    """Run the batches through the model, BatchNorm layers in train mode and everything else in eval mode,
    and accumulate the moments of every BatchNorm layer's inputs; return them and the number of batches.

    `forward(model, batch)` runs one batch (default: default_forward, moving tensors to `device` and the model's
    dtype); `layers` (default: every BatchNorm layer) are the ones measured: the others stay in eval mode.
    BatchNorm's own running buffers are updated by the forward passes but never read: the statistics come
    from the hooks, so momentum and the buffers' initial values do not matter.
    """
    import torch

    layers = batchnorm_modules(model) if layers is None else layers
    moments: dict[str, Moments | None] = {name: None for name, _ in layers}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if forward is None:

        def forward(model, batch):
            default_forward(model, batch, device, dtype)

    def hook_for(name: str):
        def hook(module, args):
            moments[name] = merge(moments[name], batch_moments(args[0]))

        return hook

    def fused_hooks(name: str):
        """BatchNorm's own forward measures the batch (CPU: accumulated in float64, two passes); with momentum 1
        and the buffers reset, running_mean/var after the forward are that batch's mean and unbiased variance,
        rounded once to float32. Read them, and merge in float64: no extra pass over the activation."""

        def before(module, args):
            module.running_mean.zero_()  # 0 * NaN would be NaN: no old value may leak into (1 - 1) * old
            module.running_var.fill_(1.0)

        def after(module, args, output):
            x = args[0]
            n = x.numel() // x.shape[1]
            mean = module.running_mean.to(torch.float64)
            var = module.running_var.to(torch.float64)
            # float32 rounds the mean to 2^-24 |mean|, and torch centres the variance on that rounded mean: far from
            # 0 in units of the std (an offset of 1e4 on a std of 1) both are off by more than 1e-7 std, so such a
            # layer is measured again about its rounded mean, where nothing is lost (two fused passes).
            if bool((mean.abs() > 8.0 * var.sqrt()).any()):
                mean, m2 = _shifted_moments(x, module.running_mean)
            else:
                m2 = var * (n - 1)
            moments[name] = merge(moments[name], Moments(n, mean, m2))

        return before, after

    was_training = {m: m.training for m in model.modules()}
    fused = [(name, m) for name, m in layers if _has_fused_stats(m, device)]
    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in layers if (name, m) not in fused]
    for name, m in fused:
        before, after = fused_hooks(name)
        handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    momenta = {m: m.momentum for _, m in fused}
    for m in momenta:
        m.momentum = 1.0  # the running buffers become the batch's own statistics (read by the hooks above)
    # SyncBatchNorm would all-reduce batch statistics across ranks in train mode: other semantics than one
    # process, and a hang when ranks run different numbers of batches. Normalize each batch locally instead.
    synced = [m for _, m in layers if isinstance(m, torch.nn.SyncBatchNorm)]
    for m in synced:
        m.forward = _local_batch_norm(m)
    model.eval()
    for _, m in layers:
        m.train()
    count = 0
    ACTIVE[0] += 1
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
                count += 1
                if on_batch is not None:
                    on_batch()
    finally:
        ACTIVE[0] -= 1
        for h in handles:
            h.remove()
        for m in synced:
            del m.forward
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in was_training.items():
            m.training = training
    empty = {name: Moments(0, torch.zeros(m.num_features, dtype=torch.float64, device=device),
                           torch.zeros(m.num_features, dtype=torch.float64, device=device)) for name, m in layers}
    return {name: moments[name] or empty[name] for name, _ in layers}, count


def _local_batch_norm(module):
    import torch.nn.functional as F

    def forward(x):
        return F.batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias, True,
                            1.0 if module.momentum is None else module.momentum, module.eps)

    return forward


def _has_fused_stats(module, device) -> bool:
    """Whether the layer's forward is torch's own (so its batch statistics land in the running buffers) and runs
    on the CPU, where torch accumulates them in float64. Elsewhere (CUDA accumulates in float32, or a subclass
    with a forward of its own) the pre-hook measures the input itself, in float64."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    if torch.device(device).type != "cpu" or module.running_mean.dtype not in (torch.float32, torch.float64):
        return False
    own = type(module).forward
    return own is _BatchNorm.forward or (isinstance(module, torch.nn.SyncBatchNorm) and own is torch.nn.SyncBatchNorm.forward)


def _shifted_moments(x, shift):
    """(mean, M2) per channel about a shift close to the mean: x - shift is exact there (Sterbenz) and of the
    order of the std, and torch's CPU var_mean accumulates it in float64, so its float32 results lose ~1e-7 of
    the std, however far the data sits from 0. One subtraction and one fused pass; no float64 copy."""
    import torch

    dims = [0, *range(2, x.dim())]
    shift = shift.to(x.dtype)
    var, mean = torch.var_mean(x - shift.view(1, -1, *[1] * (x.dim() - 2)), dim=dims, correction=0)
    n = x.numel() // x.shape[1]
    return shift.to(torch.float64) + mean.to(torch.float64), var.to(torch.float64) * n


def run_model(model, x) -> None:
    try:
        model(x)
    except (RuntimeError, ValueError, TypeError) as exc:
        text = first_line(exc)
        if "Expected more than 1 value per channel" in text:
            raise InputError(
                f"a batch of shape {tuple(x.shape)} gives a BatchNorm layer only one value per channel, and a batch of "
                "one value has no variance; choose --batch-size or --num-samples so that no batch is that small"
            ) from None
        raise InputError(f"the model failed on a batch of shape {tuple(x.shape)}: {type(exc).__name__}: {text}") from None


# --------------------------------------------------------------------------- the model


def load_factory(spec: str, option: str = "--model") -> Callable[..., Any]:
    """MODULE:FACTORY -> the callable; the current directory is importable, as with `python -m`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"{option} {spec}: expected MODULE:{'FACTORY' if option == '--model' else 'FN'}, e.g. "
                         f"mypackage.{'models:resnet18' if option == '--model' else 'data:calibration_batches'}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"{option} {spec}: cannot import {module_name!r} ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise InputError(f"{option} {spec}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{option} {spec}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{option} {spec}: {attr!r} is not callable")
    return obj


def build_model(spec: str, kwargs: dict[str, Any] | None = None):
    import torch

    factory = load_factory(spec)
    try:
        model = factory(**(kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        raise InputError(f"--model {spec}: calling it raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"--model {spec}: returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_into(model, ckpt, spec: str) -> None:
    """Strict load of the (prefix-stripped) checkpoint into the model; mismatches name the keys.

    torch's own non-strict load does the matching, so its compatibility rules still apply (an old checkpoint
    without num_batches_tracked loads), and any key it reports missing or unexpected is refused here.
    """
    import torch

    state = {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(ckpt.read(k))) for k, v in ckpt.items()}
    path = ckpt.provenance.path
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise InputError(f"{path}: does not fit --model {spec}: {' '.join(lines) or str(exc).strip()}") from None
    parts = []
    if result.missing_keys:
        parts.append(f"missing keys: {_some(result.missing_keys)}")
    if result.unexpected_keys:
        parts.append(f"unexpected keys: {_some(result.unexpected_keys)}")
    if parts:
        raise InputError(f"{path}: does not fit --model {spec}: {'; '.join(parts)}")


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    owned: bool  # whether we created the process group (and so destroy it)


def init_distributed(device: str) -> Dist:
    """Under torchrun (WORLD_SIZE > 1) join the process group: gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist(0, 1, False)
    import torch.distributed as dist

    if not dist.is_available():
        raise InputError("WORLD_SIZE is set but this torch has no torch.distributed support")
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), False)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), True)


_MAX_MESSAGE = 4096  # bytes of an error message sent to the other ranks


class agreement:
    """`with agreement(ctx, device):` around work that may fail on some ranks only. On leaving, every rank learns
    whether any rank failed (one all-reduce, MIN over the failing ranks); if one did, the lowest failing rank
    broadcasts its exit code and message, and every rank raises RankError with that code: rank 0 says it, the
    others exit quietly. So no rank is left waiting in a collective for a peer that has gone, and no rank goes
    on to write. Every rank must pass through the same agreements in the same order."""

    def __init__(self, ctx: Dist, device: str) -> None:
        self.ctx = ctx
        self.device = device

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.ctx.world_size == 1 or (exc is not None and not isinstance(exc, Exception)):
            return False  # one process: the error is its own; KeyboardInterrupt and exits pass through
        import torch
        import torch.distributed as dist

        from bncli.errors import BncliError, ExitCode, RankError, internal_message

        ctx = self.ctx
        flag = torch.tensor([ctx.rank if exc is not None else ctx.world_size], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        first = int(flag.item())
        if first == ctx.world_size:
            return False
        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        payload = b""
        if ctx.rank == first:
            if isinstance(exc, BncliError):
                code, message = int(exc.exit_code), exc.message
            else:
                code, message = int(ExitCode.INTERNAL), internal_message(exc)
            payload = message.encode("utf-8", "replace")[:_MAX_MESSAGE]
            header[0], header[1] = code, len(payload)
        dist.broadcast(header, src=first)
        code, length = int(header[0].item()), int(header[1].item())
        buffer = torch.tensor(list(payload) or [0], dtype=torch.uint8, device=self.device) if ctx.rank == first else (
            torch.zeros(max(length, 1), dtype=torch.uint8, device=self.device))
        dist.broadcast(buffer, src=first)
        message = bytes(buffer[:length].cpu().tolist()).decode("utf-8", "replace")
        if ctx.rank == 0:
            if first == 0 and exc is not None:
                return False  # our own error, raised as it is (with its traceback under --debug)
            raise RankError(f"rank {first} of {ctx.world_size}: {message}", code, quiet=False) from exc
        raise RankError(message, code, quiet=True) from exc


def reduce_moments(local: dict[str, Moments], batches: int, samples: int, ctx: Dist, device: str):
    """Gather every rank's (count, mean, M2) and merge them in rank order, so the result never depends on timing."""
    if ctx.world_size == 1:
        return local, batches, samples
    import torch
    import torch.distributed as dist

    names = list(local)
    packed = torch.cat(
        [torch.tensor([float(batches), float(samples)], dtype=torch.float64, device=device)]
        + [torch.cat([torch.tensor([float(local[n].count)], dtype=torch.float64, device=device), local[n].mean, local[n].m2])
           for n in names]
    )
    gathered = [torch.empty_like(packed) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, packed)
    merged: dict[str, Moments | None] = {n: None for n in names}
    total_batches = total_samples = 0
    for part in gathered:  # rank order
        total_batches += int(part[0].item())
        total_samples += int(part[1].item())
        offset = 2
        for n in names:
            c = local[n].mean.shape[0]
            count = int(part[offset].item())
            mean, m2 = part[offset + 1 : offset + 1 + c], part[offset + 1 + c : offset + 1 + 2 * c]
            merged[n] = merge(merged[n], Moments(count, mean, m2))
            offset += 1 + 2 * c
    return {n: m for n, m in merged.items() if m is not None}, total_batches, total_samples


# --------------------------------------------------------------------------- the command's core


def _refuse(message: str, code: ExitCode = ExitCode.USAGE) -> RankError:
    """An error found before the process group exists, alike on every rank: only rank 0 says it."""
    return RankError(message, code, quiet=os.environ.get("RANK", "0") not in ("", "0"))


def check_options(*, data, loader, output, check, max_shift, max_var_ratio, batch_size, num_samples, key) -> None:
    """The settings that cannot work together, refused before any work (exit 2)."""
    if bool(data) == (loader is not None):
        raise _refuse("give the calibration data with --data PATH or --loader MODULE:FN (one of them)")
    if loader is not None:
        given = [name for name, value in (("--batch-size", batch_size), ("--num-samples", num_samples), ("--key", key))
                 if value is not None]
        if given:
            raise _refuse(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --data files; "
                          "a --loader yields its own batches")
    if check and output is not None:
        raise _refuse("--check writes nothing: use it without --output")
    if not check and output is None:
        raise _refuse("--output is required (or --check, to compare the statistics without writing)")
    if not (max_shift > 0):
        raise _refuse(f"--max-shift must be greater than 0; got {max_shift:g}")
    if not (max_var_ratio > 1):
        raise _refuse(f"--max-var-ratio must be greater than 1 (a ratio r fails when r > it or r < 1/it); got {max_var_ratio:g}")


class _Counted:
    """The --loader's batches, this rank's share (batch i goes to rank i mod K), counting samples where a batch
    says its size (a tensor, or a tuple/list/dict whose first tensor has one); errors name --loader."""

    def __init__(self, spec: str, iterable, rank: int, world_size: int) -> None:
        self.spec, self.iterable, self.rank, self.world_size = spec, iterable, rank, world_size
        self.samples: int | None = 0

    def __iter__(self):
        try:
            iterator = iter(self.iterable)
        except TypeError:
            raise InputError(f"--loader {self.spec}: returned a {type(self.iterable).__name__}, not an iterable of batches") from None
        i = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - the user's loader failed
                raise InputError(f"--loader {self.spec}: raised {type(exc).__name__} at batch {i}: {first_line(exc)}") from None
            if i % self.world_size == self.rank:
                size = _batch_size(batch)
                self.samples = None if size is None or self.samples is None else self.samples + size
                yield batch
            i += 1


def _batch_size(batch) -> int | None:
    import torch

    if isinstance(batch, dict):
        batch = next(iter(batch.values()), None)
    elif isinstance(batch, (tuple, list)):
        batch = batch[0] if batch else None
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() > 0 else None


def user_forward(spec: str, moved: bool, device, dtype):
    """forward(model, batch) from --forward MODULE:FN; --data batches arrive on the device in the model's dtype."""
    fn = load_factory(spec, "--forward")

    def forward(model, batch):
        if moved:
            batch = batch.to(device=device, dtype=dtype)
        try:
            fn(model, batch)
        except Exception as exc:  # noqa: BLE001 - the user's forward (or the model) failed
            text = first_line(exc)
            if "Expected more than 1 value per channel" in text:
                raise InputError(f"--forward {spec}: a batch gives a BatchNorm layer only one value per channel, and "
                                 "a batch of one value has no variance") from None
            raise InputError(f"--forward {spec}: raised {type(exc).__name__}: {text}") from None

    return forward


def recalibrate(
    checkpoint: str | os.PathLike,
    *,
    model: str,
    data: list[str | os.PathLike] | None = None,
    output: str | os.PathLike | None = None,
    loader: str | None = None,
    forward: str | None = None,
    layers: list[str] | None = None,
    check: bool = False,
    max_shift: float = 0.5,
    max_var_ratio: float = 2.0,
    model_kwargs: dict[str, Any] | None = None,
    key: str | None = None,
    num_samples: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    state: str | None = None,
    strip_prefix: str | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
) -> RecalibrateReport | None:
    """Recalibrate CHECKPOINT on the data and write OUTPUT, or with `check` compare the stored statistics with the
    data's and write nothing; return the report (None on ranks other than 0).

    The data: `data` files (batches of `batch_size`, default 64, at most `num_samples`, default 8192) or `loader`
    (MODULE:FN, FN() returning any iterable of batches). `forward` (MODULE:FN) runs one batch; `layers` (globs)
    picks the BatchNorm layers to re-estimate."""
    import torch

    from bncli import calib_data
    from bncli.loading import load_checkpoint

    check_options(data=data, loader=loader, output=output, check=check, max_shift=max_shift,
                  max_var_ratio=max_var_ratio, batch_size=batch_size, num_samples=num_samples, key=key)
    if loader is None:
        batch_size = 64 if batch_size is None else batch_size
        num_samples = 8192 if num_samples is None else num_samples
    if device == "cuda" and not torch.cuda.is_available():
        # Before the process group exists, so every rank finds this alike: only rank 0 says it.
        raise _refuse("--device cuda: CUDA is not available (no GPU visible, or this torch was built without CUDA)",
                      ExitCode.INPUT)
    ctx = init_distributed(device)
    try:
        run_device = device
        if device == "cuda" and ctx.world_size > 1:
            run_device = f"cuda:{int(os.environ.get('LOCAL_RANK', ctx.rank)) % torch.cuda.device_count()}"
            torch.cuda.set_device(run_device)
        # Under torchrun any rank may fail on its own (its share of the data, its file system): the ranks agree
        # on that before the all-gather and again before exiting, so every rank exits with the real error's code.
        with agreement(ctx, run_device):
            ckpt = load_checkpoint(checkpoint, state=state, strip_prefix=strip_prefix)
            net = build_model(model, model_kwargs)
            load_into(net, ckpt, model)
            net.to(run_device)
            chosen = select_modules(net, layers)
            dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
            run = None if forward is None else user_forward(forward, loader is None, run_device, dtype)
            if loader is None:
                sources = calib_data.discover(data, key)
                planned = calib_data.plan(sources, batch_size, num_samples)
                if not planned:
                    raise InputError(f"{', '.join(str(s.path) for s in sources)}: no samples to calibrate on (N = 0)")
                mine = planned[ctx.rank :: ctx.world_size]  # batch i goes to rank i mod K: every rank reads only its share
                local_samples = sum(end - start for b in mine for _, start, end in b)
                batches, total = calib_data.iterate(sources, mine), len(mine)
                available = sum(s.n for s in sources)
            else:
                made = load_factory(loader, "--loader")
                try:
                    iterable = made()
                except Exception as exc:  # noqa: BLE001 - the user's loader failed
                    raise InputError(f"--loader {loader}: calling it raised {type(exc).__name__}: {first_line(exc)}") from None
                batches = counted = _Counted(loader, iterable, ctx.rank, ctx.world_size)
                total, available = None, None
            with _progress(progress and ctx.rank == 0, total) as advance:
                local, local_batches = population_moments(net, batches, run_device, advance, forward=run, layers=chosen)
            if loader is not None:
                if local_batches == 0 and ctx.world_size == 1:
                    raise InputError(f"--loader {loader}: yielded no batch")
                local_samples = counted.samples
        countable = torch.tensor([0 if local_samples is None else 1], device=run_device)
        if ctx.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(countable, op=dist.ReduceOp.MIN)  # every rank passes here: the same collectives everywhere
        moments, total_batches, total_samples = reduce_moments(local, local_batches, local_samples or 0, ctx, run_device)
        if not int(countable.item()):
            total_samples = None
        with agreement(ctx, run_device):
            if total_batches == 0:
                raise InputError(f"--loader {loader}: yielded no batch")
            common = dict(model=model, device=device, world_size=ctx.world_size, batch_size=batch_size,
                          samples=total_samples, available=available, loader=loader, total_batches=total_batches)
            if check:
                report = _check_report(ckpt, moments, data, max_shift, max_var_ratio, warn, **common)
                if ctx.rank == 0:
                    return report
                if not report.check.passed:
                    raise RankError("", ExitCode.FINDINGS, quiet=True)  # every rank exits 1, rank 0 prints
                return None
            if ctx.rank == 0:
                return _write_and_report(ckpt, net, moments, output, strip_prefix=strip_prefix, warn=warn, **common)
        return None
    finally:
        if ctx.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _unused(moments, warn) -> tuple[str, ...]:
    unused = tuple(n for n, m in moments.items() if m.count == 0)
    for name in unused:
        if warn is not None:
            warn(f"{name}: received no input from the model's forward pass; its statistics are left as they were")
    return unused


def _write_and_report(ckpt, net, moments, output, *, total_batches, strip_prefix, warn, **common) -> RecalibrateReport:
    """Rank 0's part: write the new statistics and diff what was written against what was there."""
    from bncli.diff import diff_layers
    from bncli.loading import load_checkpoint

    modules = dict(batchnorm_modules(net))
    unused = _unused(moments, warn)
    updates = {}
    for name, m in moments.items():
        if m.count == 0:
            continue
        updates[f"{name}.running_mean"] = m.mean.cpu()
        updates[f"{name}.running_var"] = m.var.cpu()
        counter = f"{name}.num_batches_tracked"
        if getattr(modules[name], "num_batches_tracked", None) is not None and counter in ckpt:
            updates[counter] = int(ckpt.read(counter).reshape(())) + total_batches
    # The statistics before are read now: OUTPUT may be CHECKPOINT itself, and is then replaced by the write.
    before = bn_layers(ckpt)
    write_checkpoint(ckpt, updates, Path(output), warn)
    prov = ckpt.provenance
    written = load_checkpoint(output, state=prov.container, strip_prefix=strip_prefix)  # what was written, read back
    report = diff_layers(
        before,
        bn_layers(written),
        path_a=prov.path,
        path_b=written.provenance.path,
        prefix_a=prov.prefix,
        prefix_b=written.provenance.prefix,
    )
    return RecalibrateReport(checkpoint=prov.path, output=str(output), batches=total_batches, unused=unused,
                             diff=report, **common)


def drift_score(layer, max_shift: float, max_var_ratio: float) -> float:
    """How far a layer is from fitting the data, in units of its thresholds (> 1 fails): the larger of
    max shift / --max-shift and |log var ratio| / log --max-var-ratio; inf for NaN or an impossible ratio."""
    import math

    values = (layer.max_shift, layer.var_ratio_min, layer.var_ratio_max)
    if any(v is None or v != v for v in values) or layer.var_ratio_min <= 0:
        return math.inf
    log_ratio = max(abs(math.log(layer.var_ratio_min)), abs(math.log(layer.var_ratio_max))) if layer.var_ratio_max > 0 else math.inf
    return max(layer.max_shift / max_shift, log_ratio / math.log(max_var_ratio))


def _check_report(ckpt, moments, data, max_shift, max_var_ratio, warn, *, total_batches, **common) -> RecalibrateReport:
    """--check: the stored statistics (A) against the data's population statistics (B), worst layer first."""
    import dataclasses

    from bncli.diff import diff_layers
    from bncli.layers import BNLayer

    unused = _unused(moments, warn)
    stored = {bn.name: bn for bn in bn_layers(ckpt)}
    before, measured = [], []
    for name, m in moments.items():
        if m.count == 0 or name not in stored:
            continue
        old = stored[name]
        before.append(old)
        measured.append(BNLayer(name, m.mean.cpu().numpy(), m.var.cpu().numpy(), old.weight, old.bias, None, "float64"))
    source = f"--loader {common['loader']}" if common["loader"] else "--data " + " ".join(str(d) for d in data)
    prov = ckpt.provenance
    report = diff_layers(before, measured, path_a=prov.path, path_b=f"measured on {source}", prefix_a=prov.prefix)
    scores = {x.name: drift_score(x, max_shift, max_var_ratio) for x in report.layers}
    ranked = tuple(sorted(report.layers, key=lambda x: -scores[x.name]))  # stable: file order among equals
    report = dataclasses.replace(report, layers=ranked)
    failed = tuple(x.name for x in ranked if scores[x.name] > 1)
    return RecalibrateReport(checkpoint=prov.path, output=None, batches=total_batches, unused=unused, diff=report,
                             check=CheckResult(max_shift, max_var_ratio, failed), **common)


def bn_layers(ckpt) -> list:
    """Every BatchNorm layer of the checkpoint; Checkpoint.read returns arrays of their own, so these survive the
    file being replaced next."""
    from bncli.layers import find_layers, read_layer

    return [read_layer(ckpt, k) for k in find_layers(ckpt)]


class _progress:
    """A Rich progress bar on stderr, or nothing; yields a function to call after every batch."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self.bar = None

    def __enter__(self) -> Callable[[], None] | None:
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task("recalibrating", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.stop()


# --------------------------------------------------------------------------- writing


def write_checkpoint(ckpt, updates: dict[str, Any], output: Path, warn: Callable[[str], None] | None = None) -> None:
    """Write the input file again with the new statistics, keeping its format, wrapping, prefix and dtypes."""
    from bncli.atomic import write_atomic

    prov = ckpt.provenance
    prefix = prov.prefix or ""
    suffix = output.suffix.lower()
    if prov.format == "safetensors":
        if suffix != ".safetensors" and warn is not None:
            warn(f"{output}: written as safetensors, the input's format, whatever its suffix")
        write_atomic(output, lambda fh: fh.write(_safetensors_bytes(Path(prov.path), updates, prefix)))
        return
    import torch

    from bncli.loading import torch_load_checked

    if suffix == ".safetensors" and warn is not None:
        warn(f"{output}: written as a torch file, the input's format, whatever its suffix")
    obj = torch_load_checked(Path(prov.path), prov.format)
    node = obj
    for part in (prov.container or "").split(".") if prov.container else ():
        node = node[part]
    for key, value in updates.items():
        full = prefix + key
        old = node[full]
        node[full] = _like(old, value)
    write_atomic(output, lambda fh: torch.save(obj, fh))


def _like(old: Any, value: Any):
    """The new value in the old one's type, dtype and shape (num_batches_tracked may be a plain int)."""
    import torch

    if isinstance(old, torch.Tensor):
        return torch.as_tensor(value).to(old.dtype).reshape(old.shape).clone()
    if isinstance(old, int):
        return int(value)
    return float(value)


def _safetensors_bytes(path: Path, updates: dict[str, Any], prefix: str) -> bytes:
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in updates.items():
        full = prefix + key
        tensors[full] = _like(tensors[full], value)
    return save(tensors, metadata=metadata)


from bncli.api import callable_module  # noqa: E402 - last: the module is complete before it becomes callable

callable_module(__name__, "recalibrate")
