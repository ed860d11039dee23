"""The `normalize` core: validate a tensor's shape, apply BatchNorm1d/2d/3d exactly as torch does, measure it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from bncli.errors import InputError, ShapeError, UsageError
from bncli.report import ChannelStats, NormalizeReport

if TYPE_CHECKING:
    import torch

OUTPUT_SUFFIXES = (".pt", ".pth", ".safetensors")


def _dtypes():
    import torch

    return (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what torch's CPU batch_norm implements


KINDS = ("1d", "2d", "3d")
# kind -> (the input shapes BatchNorm{kind} takes, named; their numbers of dimensions; the names of dims 2..)
LAYOUTS = {
    "1d": ("(N, C) or (N, C, L)", (2, 3), ("L",)),
    "2d": ("(N, C, H, W)", (4,), ("H", "W")),
    "3d": ("(N, C, D, H, W)", (5,), ("D", "H", "W")),
}
# the per-sample layout --add-batch-dim expects, by kind
SAMPLE = {"1d": "(C, L)", "2d": "(C, H, W)", "3d": "(C, D, H, W)"}


def kind_of(class_path: str | None) -> str | None:
    """'1d', '2d' or '3d' from a module's class (e.g. torch.nn.modules.batchnorm.BatchNorm1d); None if it does not
    say (SyncBatchNorm takes any of them)."""
    name = (class_path or "").rpartition(".")[2]
    for kind in KINDS:
        if name.endswith(f"BatchNorm{kind}"):
            return kind
    return None


def validate_input(
    x: torch.Tensor, source: str, *, add_batch_dim: bool = False, channels_last: bool = False, kind: str = "2d"
) -> torch.Tensor:
    """Return `x` in the layout BatchNorm{kind} takes, channels in dim 1, or raise ShapeError with one line that
    says what to do."""
    shapes, dims, _ = LAYOUTS[kind]
    name = f"BatchNorm{kind}"
    if x.dtype not in _dtypes():
        raise ShapeError(
            f"{source}: dtype {str(x.dtype).removeprefix('torch.')} is not supported; {name} needs a floating-point "
            "tensor (float16, bfloat16, float32 or float64)"
        )
    if add_batch_dim:
        if x.dim() + 1 not in dims or (kind == "1d" and x.dim() != 2):
            raise ShapeError(f"{source}: --add-batch-dim expects a {len(SAMPLE[kind].split(','))}-D tensor {SAMPLE[kind]}; "
                             f"got shape {_shape(x)}")
        x = x.unsqueeze(0)
    if channels_last and x.dim() in dims and x.dim() >= 3:
        x = x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))  # (N, ..., C) -> (N, C, ...)
    if x.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ShapeError(f"{source}: expected a {expected} tensor {shapes} for {name}; got shape {_shape(x)}"
                         f"{_dim_hint(x.dim(), kind)}")
    if x.numel() == 0:
        raise ShapeError(f"{source}: the tensor is empty (shape {_shape(x)}); {name} needs at least one value")
    return x


def _dim_hint(dim: int, kind: str = "2d") -> str:
    """What a tensor of `dim` dimensions probably is, and the option that takes it."""
    if dim == 0:
        return ": a scalar, not a batch"
    if dim == 1:
        return ": a 1-D vector; BatchNorm needs a batch (N, C, ...)"
    fits = [k for k in KINDS if dim in LAYOUTS[k][1] and k != kind]
    hint = f": BatchNorm{fits[0]} takes {LAYOUTS[fits[0]][0]}: pass --kind {fits[0]}" if fits else ""
    if dim + 1 in LAYOUTS[kind][1] and not (kind == "1d" and dim != 2):
        hint += f"{'; or ' if hint else ': '}a single sample {SAMPLE[kind]}? add a batch dimension with --add-batch-dim"
    return hint


def _shape(x) -> str:
    return "(" + ", ".join(str(d) for d in x.shape) + (",)" if x.dim() == 1 else ")")


def check_channels(x: torch.Tensor, num_features: int, source: str, layer: str, channels_last: bool) -> None:
    channels = x.shape[1]
    if channels == num_features:
        return
    hint = ""
    if not channels_last and x.shape[-1] == num_features and x.dim() >= 3 and _looks_channels_last(x):
        last = {3: "(N, L, C)", 4: "(N, H, W, C)", 5: "(N, D, H, W, C)"}[x.dim()]
        hint = f"; its last dimension is {num_features}: channels-last {last}? pass --channels-last"
    raise ShapeError(f"{source}: {channels} channels in dim 1 but {layer} has num_features={num_features}{hint}")


def _looks_channels_last(x: torch.Tensor) -> bool:
    """An (N, C, H, W) reading with square images beats an (N, H, W, C) reading with non-square ones."""
    if x.dim() != 4:
        return True
    _, d1, d2, d3 = x.shape
    return not (d2 == d3 and d1 != d2)


def channels_last_warning(x: torch.Tensor) -> str | None:
    """A fresh layer takes dim 1 as channels whatever it is; say so when a 4-D tensor looks NHWC."""
    if x.dim() != 4:
        return None
    _, d1, d2, d3 = x.shape
    if d3 in (1, 3, 4) and d1 == d2 and d1 > 4:
        return (
            f"shape {_shape(x)} looks channels-last (N, H, W, C) with C={d3}; BatchNorm2d is treating dim 1 "
            f"({d1}) as the channels. Pass --channels-last if the tensor is NHWC"
        )
    return None


def check_train_batch(x: torch.Tensor, source: str, kind: str = "2d") -> None:
    if x.numel() // x.shape[1] == 1:
        product = "*".join(["N", *LAYOUTS[kind][2][: x.dim() - 2]])
        raise ShapeError(
            f"{source}: train mode needs more than 1 value per channel to compute batch statistics; "
            f"shape {_shape(x)} gives {product} = 1. Use --mode eval, or a larger batch"
        )


def check_zero_variance(num_features: int, state, source: str) -> None:
    """Eval mode with eps 0: a zero running_var divides by zero. Refuse it, naming the channels, rather than print
    inf (a fresh layer's running_var is 1)."""
    if state is None:
        return
    import numpy as np

    channels = tuple(int(i) for i in np.flatnonzero(state.running_var == 0))
    if channels:
        from bncli.rules import _show

        raise InputError(
            f"{source}: with --eps 0, running_var is 0 in channel(s) {_show(channels)} of the layer: normalizing would "
            "divide by zero; pass an eps > 0 (PyTorch's default is 1e-5)"
        )


def build_layer(num_features: int, *, eps: float, momentum: float | None, affine: bool, state=None, kind: str = "2d"):
    """An nn.BatchNorm1d/2d/3d with the given parameters and, from a checkpoint layer, its values."""
    import torch
    from torch import nn

    module = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}[kind]
    bn = module(num_features, eps=eps, momentum=momentum, affine=affine)
    if state is not None:
        with torch.no_grad():
            bn.running_mean.copy_(torch.from_numpy(state.running_mean))
            bn.running_var.copy_(torch.from_numpy(state.running_var))
            bn.num_batches_tracked.fill_(state.num_batches_tracked or 0)
            if affine:  # a file may hold only one of the two: the other keeps its identity value (1 or 0)
                if state.weight is not None:
                    bn.weight.copy_(torch.from_numpy(state.weight))
                if state.bias is not None:
                    bn.bias.copy_(torch.from_numpy(state.bias))
    return bn


# The defaults of a fresh BatchNorm2d, used where neither an option nor the checkpoint's layer says otherwise.
DEFAULT_EPS, DEFAULT_MOMENTUM = 1e-5, 0.1
UNSET = "unset"  # momentum not given (None already means a cumulative average)


def normalize(
    input_path: str | os.PathLike,
    *,
    mode: str = "train",
    eps: float | None = None,
    momentum: float | None | str = UNSET,
    affine: bool = True,
    checkpoint: str | os.PathLike | None = None,
    layer: str | None = None,
    key: str | None = None,
    channels_last: bool = False,
    add_batch_dim: bool = False,
    output: str | os.PathLike | None = None,
    kind: str | None = None,
) -> NormalizeReport:
    """Apply one BatchNorm1d/2d/3d (fresh, or a checkpoint's layer) to a tensor and report per-channel statistics.

    `eps` and `momentum` left unset take the checkpoint layer's own (a whole pickled model states them), else
    PyTorch's defaults; kind None: the checkpoint layer's own class when the file names it, else 2d."""
    import torch

    from bncli.loading import load_tensor

    if output is not None and Path(output).suffix not in OUTPUT_SUFFIXES:
        raise InputError(f"{output}: unsupported output suffix; use one of {', '.join(OUTPUT_SUFFIXES)}")
    if (checkpoint is None) != (layer is None):
        raise InputError("--checkpoint and --layer go together: name the file and the layer in it")
    from_layer: list[str] = []
    state = _checkpoint_layer(checkpoint, layer) if checkpoint is not None else None
    if eps is None:
        eps = DEFAULT_EPS if state is None or state.eps is None else state.eps
        if state is not None and state.eps is not None:
            from_layer.append("eps")
    if momentum == UNSET:
        momentum = state.momentum if state is not None and state.momentum_given else DEFAULT_MOMENTUM
        if state is not None and state.momentum_given:
            from_layer.append("momentum")
    if eps == 0 and mode == "train":
        raise UsageError(
            "--eps 0 works in eval mode only: torch's batch_norm refuses eps 0 in training (FrozenBatchNorm2d layers, "
            "which use it, are never trained); use --mode eval or an eps > 0"
        )

    if kind is None:
        kind = kind_of(getattr(state, "class_path", None)) or "2d"
    raw, key_used = load_tensor(input_path, key)
    source = f"{input_path}" + (f"[{key_used}]" if key_used else "")
    x = validate_input(raw, source, add_batch_dim=add_batch_dim, channels_last=channels_last, kind=kind)

    # Whatever the layer, an NHWC tensor whose H happens to equal C passes every check and is silently wrong.
    warnings = [hint] if not channels_last and (hint := channels_last_warning(x)) else []
    if state is not None:
        affine = affine and (state.weight is not None or state.bias is not None)
        check_channels(x, state.num_features, source, f"layer {layer!r}", channels_last)
        num_features = state.num_features
    else:
        num_features = x.shape[1]
        if mode == "eval":
            warnings.append(
                f"eval mode with a fresh BatchNorm{kind}: the running statistics are the defaults (mean 0, var 1), "
                "so the output is only the input scaled by 1/sqrt(1 + eps); pass --checkpoint and --layer for trained ones"
            )
    if mode == "train":
        check_train_batch(x, source, kind)
    if eps == 0:
        check_zero_variance(x.shape[1], state, source)

    # float64 inputs get a float64 layer; float16/bfloat16 inputs keep float32 parameters, as under autocast.
    param_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    bn = build_layer(num_features, eps=eps, momentum=momentum, affine=affine, state=state, kind=kind).to(param_dtype)
    bn.train(mode == "train")
    with torch.no_grad():
        y, (in_mean, in_std), (out_mean, out_std) = apply_and_measure(bn, x)
    running_mean = bn.running_mean.double().tolist()
    running_var = bn.running_var.double().tolist()
    channels = tuple(
        ChannelStats(c, *(float(v) for v in (in_mean[c], in_std[c], out_mean[c], out_std[c], running_mean[c], running_var[c])))
        for c in range(num_features)
    )

    if output is not None:
        _write_output(y, output, key_used, channels_last=channels_last, add_batch_dim=add_batch_dim)

    return NormalizeReport(
        input_path=str(input_path),
        input_key=key_used,
        shape=tuple(raw.shape),
        dtype=str(raw.dtype).removeprefix("torch."),
        mode=mode,
        eps=eps,
        momentum=momentum,
        affine=affine,
        layer_source=None if checkpoint is None else f"{checkpoint}:{layer}",
        channels_last=channels_last,
        channels=channels,
        output_path=None if output is None else str(output),
        warnings=tuple(warnings),
        kind=kind,
        from_layer=tuple(from_layer),
    )


def apply_and_measure(bn, x: torch.Tensor):
    """y = bn(x) plus per-channel (mean, std) of x and of y, reading x about as often as bn(x) alone does.

    Block by block (a few MB of images, so each block is still in cache): statistics of the x block, the
    normalized y block written in place, statistics of that y block. Train mode needs the batch statistics
    before normalizing: one pass over x gives them in float64 (bncli.stats), then the blocks are normalized
    with them, which is what nn.BatchNorm2d computes with its own (float64-accumulated) batch statistics, and
    the running statistics are updated with torch's formula. Layouts other than contiguous NCHW float32/64
    take the plain route: bn(x), then a statistics pass over each.
    """
    import torch

    from bncli.stats import ChannelMoments, block_size, channel_mean_std, first_image_mean, moments_pass, run_blocks, settle

    fused = (
        bn.track_running_stats
        and x.is_contiguous()
        and x.dtype in (torch.float32, torch.float64)
        and x.dtype == bn.running_var.dtype
    )
    if not fused or x.numel() == 0:
        y = bn(x)
        return y, channel_mean_std(x), channel_mean_std(y)

    channels = x.shape[1]
    count = x.numel() // channels
    x_shift = first_image_mean(x)
    x_done = None
    # detached: grad mode is per thread, and the worker threads below do not inherit the caller's no_grad
    weight = bn.weight.detach() if bn.affine else None
    bias = bn.bias.detach() if bn.affine else None
    wide = None  # (mean, scale, shift) in float64 when y is computed in float64
    workers = max(1, torch.get_num_threads())
    scratch = [[None] for _ in range(workers)]  # one buffer per thread, shared by every pass and accumulator
    if bn.training:
        # The batch mean from a float64 sum of x: the running statistics are then the float64 update rounded
        # once (a float32 ulp of a running mean near 0 is far below the std's 1e-7).
        x_done = settle(moments_pass(x, x_shift, exact_mean=True, scratch=scratch), x, scratch)
        batch_mean, var_unbiased = x_done.mean_and_var()
        _update_running(bn, batch_mean, var_unbiased)
        var_biased = var_unbiased * (count - 1) / count  # normalization uses the biased variance
        mean_used, var_used = batch_mean.to(x.dtype), var_biased.to(x.dtype)
        wide = _wide_terms(batch_mean, var_biased, bn.eps, weight, bias, x.dtype)
    else:
        mean_used, var_used = bn.running_mean, bn.running_var
    # y's shift: x's first-image mean mapped through the same affine transform, close to y's own
    scale = (var_used.double() + bn.eps).rsqrt() * (1.0 if weight is None else weight.double())
    y_shift = (x_shift - mean_used.double()) * scale + (0.0 if bias is None else bias.double())

    y = torch.empty_like(x)
    x_parts = [ChannelMoments(channels, x.dtype, x_shift) for _ in range(workers)]
    y_parts = [ChannelMoments(channels, x.dtype, y_shift) for _ in range(workers)]
    unused = [(torch.empty(0, dtype=x.dtype), torch.empty(0, dtype=x.dtype)) for _ in range(workers)]

    def body(start: int, stop: int, w: int) -> None:
        block, out = x[start:stop], y[start:stop]
        if x_done is None:
            x_parts[w].add(block, scratch[w])
        if wide is not None:
            _normalize_wide(block, out, wide, scratch[w])
        else:
            # the eval-mode kernel with the chosen mean/var, written straight into y: no per-block allocation
            torch.native_batch_norm(block, weight, bias, mean_used, var_used, False, 0.0, bn.eps, out=(out, *unused[w]))
        y_parts[w].add(out, scratch[w])

    run_blocks(x.shape[0], block_size(x), body)
    if x_done is None:
        x_done = settle(_merged(x_parts), x)
    return y, x_done.result(), settle(_merged(y_parts), y).result()


def _wide_terms(mean, var_biased, eps: float, weight, bias, dtype):
    """(mean, scale, shift) in float64 for y = (x - mean) * scale + shift computed in float64 and rounded once,
    for float32 input in train mode. torch's float32 kernel computes x * alpha + beta with alpha and beta
    rounded to float32, which cancels when |mean| is large against the std (4e-2 of the std at mean 1e4,
    std 1e-2) and overflows beyond float32's range; rounding the float64 result once is as close to the float64
    formula as a float32 output can be, whatever the offset. None for other dtypes (float64 is its own wide)."""
    import torch

    if dtype != torch.float32:
        return None
    scale = (var_biased + eps).rsqrt() * (1.0 if weight is None else weight.double())
    shift = torch.zeros_like(mean) if bias is None else bias.double()
    return mean, scale, shift


def _normalize_wide(block, out, terms, scratch: list) -> None:
    """out = (block - mean) * scale + shift in float64, rounded once into out's dtype; half of the block's
    (image, channel) rows at a time, so that the float64 buffer is no larger than the float32 block."""
    import torch

    from bncli.stats import scratch_view

    b, c = block.shape[0], block.shape[1]
    rows, dest = block.reshape(b * c, -1), out.view(b * c, -1)
    mean, scale, shift = (t.repeat(b)[:, None] for t in terms)  # per row: channel = row % c
    step = max(1, -(-(b * c) * block.element_size() // 8))
    for lo in range(0, b * c, step):
        hi = min(lo + step, b * c)
        t = scratch_view(scratch, (hi - lo, rows.shape[1]), torch.float64)
        t.copy_(rows[lo:hi])
        t.sub_(mean[lo:hi]).mul_(scale[lo:hi]).add_(shift[lo:hi])
        dest[lo:hi].copy_(t)


def _merged(parts):
    for part in parts[1:]:
        parts[0].merge(part)
    return parts[0]


def _update_running(bn, batch_mean, var_unbiased) -> None:
    """What nn.BatchNorm2d does to its buffers in a training forward pass (momentum None: cumulative average)."""
    bn.num_batches_tracked += 1
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    dtype = bn.running_mean.dtype
    bn.running_mean.copy_(((1 - factor) * bn.running_mean.double() + factor * batch_mean).to(dtype))
    bn.running_var.copy_(((1 - factor) * bn.running_var.double() + factor * var_unbiased).to(dtype))


def _checkpoint_layer(checkpoint, layer: str):
    from bncli.layers import find_layers, read_layer, select_layer
    from bncli.loading import load_checkpoint
    from bncli.rules import Thresholds, check_shapes

    ckpt = load_checkpoint(checkpoint)
    keys = select_layer(find_layers(ckpt), layer, ckpt.provenance.path, ckpt.provenance.prefix)
    state = read_layer(ckpt, keys)
    for _, problem in check_shapes(state, Thresholds()):  # the same check as inspect's BN006
        raise InputError(f"{ckpt.provenance.path}: layer {layer!r}: {problem}; run `bncli inspect` on it")
    return state


def _write_output(y, output, key: str | None, *, channels_last: bool, add_batch_dim: bool) -> None:
    """Write the result in the layout the input had (channels-last and batch dimension undone)."""
    import torch

    from bncli.atomic import write_atomic

    if channels_last and y.dim() >= 3:
        y = y.permute(0, *range(2, y.dim()), 1)  # (N, C, ...) -> (N, ..., C)
    if add_batch_dim:
        y = y.squeeze(0)
    y = y.contiguous()
    if Path(output).suffix == ".safetensors":
        from safetensors.torch import save

        payload = save({key or "output": y})
        write_atomic(output, lambda fh: fh.write(payload))
    else:
        write_atomic(output, lambda fh: torch.save(y, fh))
