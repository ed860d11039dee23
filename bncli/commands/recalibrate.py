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
    "--device cuda --output out.pt",
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
        list[Path],
        typer.Option("--data", "-d", help="Tensor file (N, C, H, W) (.pt, .safetensors, .npy) or a folder of them; repeatable.",
                     show_default=False),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Write the recalibrated checkpoint here.", show_default=False)],
    model_kwargs: Annotated[
        Optional[str],
        typer.Option(
            "--model-kwargs", callback=parse_kwargs, metavar="JSON", help="JSON object of keyword arguments for FACTORY."
        ),
    ] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, help="Use at most this many samples.")] = 8192,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Samples per forward pass.")] = 64,
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
        data=list(data),
        output=output,
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
