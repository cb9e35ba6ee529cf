"""``d2v export MODEL --onnx OUT.onnx [--opset N]``: the command line of :mod:`d2v.onnx_export`.

Kept apart from the exporter so building the ``d2v`` parser imports neither torch nor onnx.
"""

from __future__ import annotations

import argparse

#: the opsets PyTorch's TorchScript exporter writes that have every op our encoders need
MIN_OPSET, MAX_OPSET = 17, 20
DEFAULT_OPSET = 17


def _cmd_export(args: argparse.Namespace) -> int:
    from d2v.onnx_export import export_onnx, load_model

    result = export_onnx(load_model(args.model), args.onnx, opset=args.opset)
    print(result.summary())
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``export`` to the ``d2v`` sub-commands."""
    p = subparsers.add_parser("export", help="export a model's inference graph to ONNX (dynamic batch and length)")
    p.add_argument("model", help="a d2v checkpoint (runs/<name>/final), a run directory (runs/<name>: its final/ "
                                 "or newest checkpoint) or a Hugging Face checkpoint directory")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx",
                   help="the ONNX file to write; OUT.json (inputs, outputs, processor, labels) goes beside it")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default: {DEFAULT_OPSET})")
    p.set_defaults(fn=_cmd_export)
    return p
