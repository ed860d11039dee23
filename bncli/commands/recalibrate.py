"""`bncli recalibrate`: re-estimate BatchNorm running statistics exactly on calibration data."""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bncli.commands.options import format_option, output_file_option, require_torch
from bncli.errors import UsageError
from bncli.render import Format

COMMAND = {
    "name": "recalibrate",
    "epilog": "Examples:  bncli recalibrate model.pt --model mypkg.models:resnet18 --data calib/ --output model.recal.pt  ·  "
    "torchrun --nproc-per-node 4 -m bncli recalibrate model.pt --model mypkg.models:resnet18 --data calib/ "
    "--device cuda --output out.pt  ·  bncli recalibrate model.pt -m mypkg.models:resnet18 --loader mypkg.data:batches "
    "--forward mypkg.data:forward --check --max-shift 0.3",
}


class Device(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


def parse_kwargs(value: Optional[str]) -> Optional[dict[str, Any]]:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter('expected a JSON object, e.g. \'{"num_classes": 10}\'')
    return parsed


def check_model(value: str) -> str:
    module, _, factory = value.partition(":")
    if not module or not factory:
        raise typer.BadParameter(f"{value!r}: expected MODULE:FACTORY, e.g. mypackage.models:resnet18")
    return value


def check_spec(value: str, example: str) -> str:
    module, _, fn = value.partition(":")
    if not module or not fn:
        raise typer.BadParameter(f"{value!r}: expected MODULE:FN, e.g. mypackage.{example}")
    return value


def run(
    checkpoint: Annotated[
        Path, typer.Argument(help="Checkpoint: .pt/.pth/.ckpt/.bin/.th (torch) or .safetensors.", show_default=False)
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            callback=check_model,
            help="The architecture, as MODULE:FACTORY, a callable returning the nn.Module (the current directory is importable).",
            show_default=False,
        ),
    ],
    data: Annotated[
        Optional[list[Path]],
        typer.Option("--data", "-d", help="Tensor file (N, C, H, W) (.pt, .safetensors, .npy) or a folder of them; repeatable.",
                     show_default=False),
    ] = None,
    loader: Annotated[
        Optional[str],
        typer.Option("--loader", metavar="MODULE:FN", callback=lambda v: v and check_spec(v, "data:calibration_batches"),
                     help="Instead of --data: FN() returns any iterable of batches (tensors, tuples, dicts, your objects)."),
    ] = None,
    forward: Annotated[
        Optional[str],
        typer.Option("--forward", metavar="MODULE:FN", callback=lambda v: v and check_spec(v, "data:forward"),
                     help="How a batch reaches the model: FN(model, batch). Default: model(batch), or model(batch[0]) for tuples."),
    ] = None,
    layers: Annotated[
        Optional[list[str]],
        typer.Option("--layers", metavar="GLOB", help="Re-estimate only these BatchNorm layers (repeatable); the others "
                     "keep their statistics and stay in eval mode."),
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write the recalibrated checkpoint here.", show_default=False)
    ] = None,
    check: Annotated[
        bool,
        typer.Option("--check", help="Write nothing: compare the stored statistics with the data's; exit 1 when a layer "
                     "passes --max-shift or --max-var-ratio."),
    ] = False,
    max_shift: Annotated[
        float, typer.Option("--max-shift", metavar="FLOAT", help="--check: largest mean shift, in stored stds.")
    ] = 0.5,
    max_var_ratio: Annotated[
        float, typer.Option("--max-var-ratio", metavar="FLOAT", help="--check: measured/stored variance within 1/R..R.")
    ] = 2.0,
    model_kwargs: Annotated[
        Optional[str],
        typer.Option(
            "--model-kwargs", callback=parse_kwargs, metavar="JSON", help="JSON object of keyword arguments for FACTORY."
        ),
    ] = None,
    num_samples: Annotated[
        Optional[int], typer.Option("--num-samples", "-n", min=1, help="Use at most this many samples.", show_default="8192")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", "-b", min=1, help="Samples per forward pass.", show_default="64")
    ] = None,
    device: Annotated[Device, typer.Option("--device", help="Where to run the model.")] = Device.CPU,
    key: Annotated[Optional[str], typer.Option("--key", "-k", help="Which tensor, when a data file holds several.")] = None,
    state: Annotated[
        Optional[str], typer.Option("--state", help="Key of the state dict inside the checkpoint, e.g. 'ema'.")
    ] = None,
    strip_prefix: Annotated[
        Optional[str],
        typer.Option(
            "--strip-prefix",
            help="Remove a prefix every key shares before matching --model, e.g. 'model.' in a Lightning checkpoint; "
            "the output keeps it.",
        ),
    ] = None,
    fmt: Annotated[Format, format_option("recalibrate", help="Output format of the before/after table.")] = Format.TABLE,
    wide: Annotated[
        bool, typer.Option("--wide", help="Tables with every column, however narrow the terminal (lines may be longer).")
    ] = False,
    output_file: Annotated[Optional[Path], output_file_option(short=False)] = None,
) -> None:
    """Re-estimate every BatchNorm layer's running_mean and running_var from calibration data, exactly.

    BatchNorm layers run in train mode (each batch normalized by its own statistics, as in training), every
    other module in eval mode. The new running_mean and running_var are the mean and unbiased variance of all
    the values that reached each layer, accumulated in float64. Under torchrun each process reads its own share
    of the batches and the statistics are merged before rank 0 writes. Prints the before/after diff.
    The data: --data files, or --loader MODULE:FN with --forward MODULE:FN for batches of any kind.
    --check writes nothing: it ranks the layers by how far the data's statistics are from the stored ones and
    exits 1 when one passes --max-shift or --max-var-ratio.
    """
    from bncli.console import warn
    from bncli.delivery import deliver

    require_torch("recalibrate")

    if output_file is not None and output is not None and Path(output_file).absolute() == Path(output).absolute():
        raise UsageError("--output-file (the report) and --output (the checkpoint) name the same file")
    from bncli.recalibrate import recalibrate
    from bncli.render import renderer_for

    report = recalibrate(
        checkpoint,
        model=model,
        model_kwargs=model_kwargs,  # already a dict: parsed by its callback
        data=list(data or ()),
        output=output,
        loader=loader,
        forward=forward,
        layers=layers or None,
        check=check,
        max_shift=max_shift,
        max_var_ratio=max_var_ratio,
        key=key,
        num_samples=num_samples,
        batch_size=batch_size,
        device=device.value,
        state=state,
        strip_prefix=strip_prefix,
        progress=sys.stderr.isatty(),
        warn=warn,
    )
    if report is not None:
        deliver(renderer_for(fmt, "recalibrate")(report), output_file, wide=wide)
        if report.check is not None and not report.check.passed:
            raise typer.Exit(1)
