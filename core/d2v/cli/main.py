"""Command line: ``d2v run|check|list|registry|convert|shards|predict|export|lm|plot|runs`` (plus plugins' commands, hook
``d2v_cli_commands``) and ``d2v-run`` (= ``d2v run``).

Bad input (spec, data, checkpoint, plugin) prints one clear message and exits with 2;
a training collapse (or too many non-finite updates in a row) exits with 3; a run stopped by
SIGTERM / SIGINT / SIGUSR1 after saving a checkpoint exits with 75 (EX_TEMPFAIL: resume it); ``d2v predict``
exits with 1 when an input got no result (:data:`d2v.use.predict.EXIT_STATUS`). Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

from d2v.api.errors import SpecError, TrainingCollapse
from d2v.train.guards import PREEMPTED_EXIT_CODE, Preempted


def _cmd_run(args: argparse.Namespace) -> int:
    from d2v.spec.config import load_spec
    from d2v.train import run

    spec = load_spec(args.spec, [*args.overrides, *(["trainer.resume=true"] if args.resume else [])])
    metrics = run(spec)
    if metrics and int(os.environ.get("RANK", "0")) == 0:  # one report under accelerate launch
        print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from d2v.spec.config import load_spec, validate

    from d2v.api import plugins
    from d2v.spec.config import resolve_model_section

    spec = load_spec(args.spec, args.overrides)
    validate(spec, check_data=not args.no_data)
    model = resolve_model_section(spec.get("model") or {}, plugins.registry())
    parts = [f"{k}={model[k]['name']}" for k in ("feature_extractor", "encoder", "head", "objective") if k in model]
    print(f"ok: {args.spec} ({spec.get('task', 'finetune')}; {', '.join(parts)}); "
          f"trainer.output_dir: {spec['trainer']['output_dir']}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from d2v.api import plugins
    from d2v.api.registry import KINDS

    registry = plugins.registry()
    if args.kind and args.kind not in KINDS:
        from d2v.api.registry import did_you_mean

        raise SpecError(f"unknown kind '{args.kind}'{did_you_mean(args.kind, KINDS) or '.'} Kinds: {', '.join(KINDS)}.")
    for kind in [args.kind] if args.kind else KINDS:
        components = registry.components(kind)
        print(f"{kind}:")
        if not components:
            print("  (none)")
        for comp in components:
            print(f"  {comp.name:<28} {comp.summary}  [{comp.plugin}]")
            if args.verbose:
                for name, default in comp.parameters().items():
                    shown = "<required>" if default is inspect.Parameter.empty else repr(default)
                    print(f"      {name} = {shown}")
    return 0


def _cmd_registry(args: argparse.Namespace) -> int:
    from d2v.api import manifest

    path = Path(args.output)
    if args.check:
        ok, message = manifest.check(path)
        print(message)
        return 0 if ok else 1
    path.write_text(manifest.render())
    print(f"wrote {path}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from d2v.interop.convert import convert

    print(convert(args.source, args.destination, to=args.to, source_format=args.source_format,
                  options={"dict": args.dict, "backbone": args.backbone}))
    return 0


def _cmd_shards(args: argparse.Namespace) -> int:
    from d2v.spec.model import spec_dataset
    from d2v.data.shards import make_shards

    dataset = spec_dataset(args.spec, args.split, args.overrides, "to turn into shards")
    index = make_shards(dataset, args.out, max_count=args.max_count, source=f"{args.spec} data.{args.split}")
    print(f"wrote {index['num_examples']} examples in {len(index['shards'])} shards to {args.out}; use it as "
          f"data.{args.split}: {{name: shards, index: {args.out}}}")
    return 0


def _parser(prog: str = "d2v") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="data2vec: fine-tune, evaluate and pretrain from YAML specs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a spec (finetune, pretrain or evaluate)")
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. trainer.max_steps=10")
    p.add_argument("--resume", action="store_true",
                   help="the same as trainer.resume=true: continue the run in trainer.output_dir from its newest "
                        "intact checkpoint, an error when it has none (trainer.resume=auto: resume if there is "
                        "a checkpoint, else start fresh)")
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("check", help="validate a spec without building anything: keys, types, parts that fit "
                                     "each other, data paths")
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--no-data", action="store_true", help="do not check that the data paths exist (a spec "
                                                          "checked away from its data)")
    p.set_defaults(fn=_cmd_check)

    p = sub.add_parser("list", help="list registered components")
    p.add_argument("kind", nargs="?")
    p.add_argument("-v", "--verbose", action="store_true", help="also show parameters and defaults")
    p.set_defaults(fn=_cmd_list)

    p = sub.add_parser("registry", help="write registry.yaml from the live registry (or --check it)")
    p.add_argument("--check", action="store_true", help="exit 1 if registry.yaml is stale")
    p.add_argument("--output", default="registry.yaml")
    p.set_defaults(fn=_cmd_registry)

    p = sub.add_parser("shards", help="tar shards (WebDataset layout) for large corpora")
    shards = p.add_subparsers(dest="shards_command", required=True)
    q = shards.add_parser("make", help="write the examples of a spec's dataset as tar shards")
    q.add_argument("spec", help="a spec whose data.<split> is the corpus (any modality)")
    q.add_argument("out", help="output directory (must not exist or be empty)")
    q.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. data.train.splits=[train-clean-100]")
    q.add_argument("--split", default="train", help="which data.<split> (default: train)")
    q.add_argument("--max-count", type=int, default=1000, help="examples per shard (default: 1000)")
    q.set_defaults(fn=_cmd_shards)

    p = sub.add_parser("convert", help="convert checkpoints: Hugging Face <-> d2v, fairseq -> d2v / Hugging Face")
    p.add_argument("source", help="a Hugging Face checkpoint directory, a d2v checkpoint (e.g. runs/x/final) "
                                  "or a fairseq checkpoint file (model.pt)")
    p.add_argument("destination", help="output directory (must not exist)")
    p.add_argument("--to", choices=("d2v", "hf"), default=None,
                   help="output format (required unless --from fairseq, which defaults to d2v)")
    p.add_argument("--from", dest="source_format", choices=("auto", "fairseq"), default="auto",
                   help="'fairseq' reads a fairseq .pt checkpoint (also chosen for any *.pt file)")
    p.add_argument("--dict", default=None, help="fairseq dictionary (e.g. dict.ltr.txt) for the output "
                                               "labels of a fine-tuned fairseq checkpoint")
    p.add_argument("--backbone", default=None, help="the fairseq pretraining checkpoint a fine-tuned one was trained "
                                                   "from, for files that do not keep its config (a data2vec 2.0 "
                                                   "text classifier: fairseq's cfg.model.model_path)")
    p.set_defaults(fn=_cmd_convert)
    from d2v.cli import export as export_cli
    from d2v.use import predict
    from d2v.cli import reports as run_reports_cli

    predict.add_parser(sub)
    export_cli.add_parser(sub)
    run_reports_cli.add_parser(sub)
    _plugin_commands(sub)
    return parser


def _plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Let plugins add subcommands (hook ``d2v_cli_commands``), naming the plugin on a clash."""
    from d2v.api import plugins

    for impl in plugins.plugin_manager().hook.d2v_cli_commands.get_hookimpls():
        try:
            impl.function(subparsers=sub)
        except argparse.ArgumentError as exc:
            raise SpecError(f"plugin '{impl.plugin_name}' adds a d2v command that clashes with another: {exc}") from None


def main(argv: list[str] | None = None, prog: str = "d2v") -> int:
    try:
        parser = _parser(prog)
    except SpecError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as exc:
        if os.environ.get("D2V_DEBUG"):  # the traceback (and its cause) for a bug report
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingCollapse as exc:
        print(f"{prog}: training stopped: {exc}", file=sys.stderr)
        return 3
    except Preempted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; completed checkpoints are kept (resume with --resume).", file=sys.stderr)
        return 130


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2v-run", usage="d2v-run SPEC [key.path=value ...] [--resume]",
        description="Run a spec (finetune, pretrain or evaluate); the same as 'd2v run'.",
        epilog="example: d2v-run experiments/asr_demo.yaml trainer.max_steps=10 optim.lr=1e-4")
    parser.add_argument("spec", help="the YAML spec file")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. trainer.max_steps=10")
    parser.add_argument("--resume", action="store_true", help="the same as trainer.resume=true")
    return parser


def run_main(argv: list[str] | None = None) -> int:
    """``d2v-run SPEC [key.path=value ...] [--resume]``: its own usage and errors, then ``d2v run``."""
    from d2v.spec.config import override_for_option

    argv = sys.argv[1:] if argv is None else argv
    parser = _run_parser()
    if not [a for a in argv if not a.startswith("-")] and not {"-h", "--help"} & set(argv):
        parser.error("say which spec to run, e.g. d2v-run experiments/asr_demo.yaml")
    _, unknown = parser.parse_known_args(argv)
    for option in (u for u in unknown if u.startswith("-")):
        meant = override_for_option(option)
        hint = f"; did you mean the override '{meant}'?" if meant else ""
        parser.error(f"unknown option '{option}': spec values are set as key.path=value{hint}")
    return main(["run", *argv], prog="d2v-run")


def console() -> int:
    """The ``d2v`` command (and ``python -m d2v.cli``): :func:`main`, ended as a launched worker
    must end (:func:`d2v.train.shutdown.end_command`)."""
    from d2v.train.shutdown import end_command

    return end_command(main())


def run_console() -> int:
    """The ``d2v-run`` command: :func:`run_main`, ended as :func:`console` is."""
    from d2v.train.shutdown import end_command

    return end_command(run_main())


if __name__ == "__main__":
    sys.exit(console())

