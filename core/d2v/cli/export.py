"""``d2v export MODEL --onnx OUT.onnx [--opset N]`` (:mod:`d2v.interop.onnx_export`), ``--tf-savedmodel
OUT_DIR`` or ``--tflite OUT.tflite`` (:mod:`d2v.interop.tf_export`): the command line of the exporters.

Kept apart from the exporters so building the ``d2v`` parser imports neither torch, onnx nor
TensorFlow.
"""

from __future__ import annotations

import argparse

from d2v.interop.opsets import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET


def _cmd_export(args: argparse.Namespace) -> int:
    if args.onnx is None:
        from d2v.interop.tf_export import export_tensorflow

        fmt, out = ("savedmodel", args.tf_savedmodel) if args.tf_savedmodel is not None else ("tflite", args.tflite)
        print(export_tensorflow(args.model, out, format=fmt).summary())
        return 0
    from d2v.interop.onnx_export import export_onnx, load_model

    result = export_onnx(load_model(args.model), args.onnx, opset=args.opset)
    print(result.summary())
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``export`` to the ``d2v`` sub-commands."""
    p = subparsers.add_parser("export", help="export a model's inference graph to ONNX (dynamic batch and length), "
                                             "a TensorFlow SavedModel or TFLite")
    p.add_argument("model", help="a d2v checkpoint (runs/<name>/final), a run directory (runs/<name>: its final/ "
                                 "or newest checkpoint) or a Hugging Face checkpoint directory")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", metavar="OUT.onnx",
                        help="the ONNX file to write; OUT.json (inputs, outputs, processor, labels) goes beside it")
    target.add_argument("--tf-savedmodel", metavar="OUT_DIR",
                        help="a TensorFlow SavedModel directory (signature serving_default; needs pip install "
                             "'d2v[tf]'), for the architectures with a TensorFlow twin (data2vec-vision)")
    target.add_argument("--tflite", metavar="OUT.tflite",
                        help="a TFLite / LiteRT file (builtin ops) and OUT.json beside it; same models as --tf-savedmodel")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default: {DEFAULT_OPSET}; --onnx only)")
    p.set_defaults(fn=_cmd_export)
    return p
