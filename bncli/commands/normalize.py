"""`bncli normalize`: apply BatchNorm1d/2d/3d to a tensor and show per-channel statistics before and after."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bncli.commands.options import check_eps, format_option, output_file_option, require_torch
from bncli.errors import UsageError
from bncli.render import Format

COMMAND = {
    "name": "normalize",
    "epilog": "Examples:  bncli normalize input.pt  ·  bncli normalize acts.pt --mode eval --checkpoint model.pt --layer features.1  ·  "
    "bncli normalize images.npy --channels-last --output out.pt",
}


class Mode(str, enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


class Kind(str, enum.Enum):
    ONE = "1d"
    TWO = "2d"
    THREE = "3d"


def parse_momentum(value: str | float | None) -> float | None:
    if value is None or str(value).lower() in ("none", "cumulative"):
        return None
    try:
        momentum = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number in [0, 1] or 'none'") from None
    if not 0.0 <= momentum <= 1.0:
        raise typer.BadParameter(f"{value} is outside [0, 1]")
    return momentum


def run(
    ctx: typer.Context,
    input: Annotated[
        Path, typer.Argument(help="Tensor file (N, C, H, W), or as --kind says: .pt/.pth, .safetensors, .npy or .npz.",
                             show_default=False, metavar="TENSOR")
    ],
    mode: Annotated[
        Mode,
        typer.Option("--mode", "-m", help="train: normalize with batch statistics and update the running ones; eval: use the running ones."),
    ] = Mode.TRAIN,
    eps: Annotated[float, typer.Option("--eps", callback=check_eps, help="Added to the variance (PyTorch 1e-5; Keras uses 1e-3). Default: the checkpoint layer's own when a whole pickled model says it, else 1e-5.")] = 1e-5,
    momentum: Annotated[
        Optional[float],
        typer.Option(
            "--momentum", parser=parse_momentum, metavar="FLOAT|none", help="Running-statistics momentum; 'none' for a cumulative average. Default: the checkpoint layer's own when a whole pickled model says it, else 0.1."
        ),
    ] = 0.1,
    affine: Annotated[bool, typer.Option("--affine/--no-affine", help="Apply weight and bias (fresh layer: 1 and 0).")] = True,
    checkpoint: Annotated[
        Optional[Path], typer.Option("--checkpoint", "-c", help="Take the layer from this checkpoint (with --layer).")
    ] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", help="Name of the BatchNorm layer in --checkpoint.")] = None,
    key: Annotated[Optional[str], typer.Option("--key", "-k", help="Which tensor, when the file holds several.")] = None,
    channels_last: Annotated[
        bool, typer.Option("--channels-last", help="The input is (N, H, W, C) (NHWC, as TensorFlow/Keras store it; "
                           "(N, L, C), (N, D, H, W, C) with --kind).")
    ] = False,
    add_batch_dim: Annotated[
        bool, typer.Option("--add-batch-dim", help="The input is one sample, (C, H, W) (or (C, L), (C, D, H, W)): add N=1.")
    ] = False,
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write the normalized tensor here (.pt or .safetensors), in the input's layout."),
    ] = None,
    kind: Annotated[
        Optional[Kind],
        typer.Option(
            "--kind",
            help="The layer: BatchNorm1d takes (N, C) or (N, C, L), 2d (N, C, H, W), 3d (N, C, D, H, W). "
            "Default: the checkpoint layer's class when the file names it, else 2d.",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[Format, format_option("normalize")] = Format.TABLE,
    wide: Annotated[
        bool, typer.Option("--wide", help="Tables with every column, however narrow the terminal (lines may be longer).")
    ] = False,
    output_file: Annotated[Optional[Path], output_file_option(short=False)] = None,
) -> None:
    """Apply BatchNorm2d (or 1d/3d with --kind) to a tensor in train or eval mode; print per-channel mean/std
    before and after.

    Eval mode is nn.BatchNorm1d/2d/3d bit for bit; float32 train mode computes each output in float64 and rounds it once,
    at least as close to the float64 result as nn.BatchNorm2d. std is computed as torch.Tensor.std does (correction=1).
    In train mode the table also shows the running statistics after the update.
    """
    from bncli.console import warn
    from bncli.delivery import deliver

    require_torch("normalize")

    if output_file is not None and output is not None and Path(output_file).absolute() == Path(output).absolute():
        raise UsageError("--output-file (the report) and --output (the tensor) name the same file")
    from bncli.normalize import normalize
    from bncli.render import renderer_for

    if (checkpoint is None) != (layer is None):
        raise typer.BadParameter("--checkpoint and --layer go together: name the file and the layer in it")
    render = renderer_for(fmt, "normalize")  # before any work: an unsupported format must not leave an output behind
    from bncli.normalize import UNSET

    # typer may vendor its own click: compare the parameter source by name
    given = {name: getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT" for name in ("eps", "momentum")}
    report = normalize(
        input,
        mode=mode.value,
        eps=eps if given["eps"] else None,  # unset: the checkpoint layer's own, when it states one
        momentum=momentum if given["momentum"] else UNSET,
        affine=affine,
        checkpoint=checkpoint,
        layer=layer,
        key=key,
        channels_last=channels_last,
        add_batch_dim=add_batch_dim,
        output=output,
        kind=None if kind is None else kind.value,
    )
    for message in report.warnings:
        warn(message)
    deliver(render(report), output_file, wide=wide)
