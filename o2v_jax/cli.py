"""The ``o2v`` command line. The only place that parses arguments; each subcommand builds
its inputs and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("o2v_jax")

CHANNELS = ("train", "validation", "test", "auxiliary")


class UsageError(Exception):
    """A problem with the command line or its inputs, reported without a traceback."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="[%(asctime)s %(levelname)s] %(message)s", datefmt="%H:%M:%S")
    # matplotlib: its first import logs "generated new fontManager" at INFO.
    for noisy in ("absl", "jax._src", "orbax", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- train

def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train an Object2Vec model from JSON Lines channels",
        description="Train an Object2Vec model. Hyperparameters use SageMaker's names, ranges "
                    "and defaults; a SageMaker hyperparameters.json works unchanged.",
        epilog="examples:\n"
               "  o2v train --train data/train.jsonl --validation data/val.jsonl \\\n"
               "      --hyperparameters hp.json --hp epochs=5 --model-dir runs/m1\n"
               "  o2v train --sagemaker --ml-root /opt/ml\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=Path, help="train channel: a JSON Lines file or a directory of them")
    p.add_argument("--validation", type=Path, help="validation channel (drives early stopping)")
    p.add_argument("--test", type=Path, help="test channel (scored once with the kept model)")
    p.add_argument("--auxiliary", type=Path, help="directory with vocab and pretrained embedding files")
    p.add_argument("--hyperparameters", type=Path, metavar="FILE",
                   help="SageMaker hyperparameters.json (a string -> string map)")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="override one hyperparameter (repeatable), e.g. --hp epochs=5")
    p.add_argument("--model-dir", type=Path, help="where the trained model is written")
    p.add_argument("--seed", type=int, default=0, help="random seed (init, shuffling, dropout, negatives); default 0")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --model-dir from its last completed epoch")
    p.add_argument("--sagemaker", action="store_true",
                   help="SageMaker layout: read <ml-root>/input/config/hyperparameters.json and "
                        "<ml-root>/input/data/<channel>, write <ml-root>/model (the default "
                        "when neither --train nor --model-dir is given, as in `docker run IMAGE train`)")
    p.add_argument("--ml-root", type=Path, default=Path("/opt/ml"), help="SageMaker root (default /opt/ml)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _sagemaker_paths(args: argparse.Namespace) -> None:
    root = args.ml_root
    hp = root / "input" / "config" / "hyperparameters.json"
    if args.hyperparameters is None and hp.is_file():
        args.hyperparameters = hp
    for channel in CHANNELS:
        path = root / "input" / "data" / channel
        if getattr(args, channel) is None and path.exists():
            setattr(args, channel, path)
    if args.model_dir is None:
        args.model_dir = root / "model"
    resource = root / "input" / "config" / "resourceconfig.json"
    args.host = "algo-1"
    if resource.is_file():
        try:
            args.host = json.loads(resource.read_text()).get("current_host", "algo-1")
        except json.JSONDecodeError:
            log.warning("%s: not valid JSON; using host=algo-1", resource)


def _run_train(args: argparse.Namespace) -> int:
    from .config import format_config, load_hyperparameters
    from .data import read_auxiliary, read_channel
    from .train import train

    args.host = "algo-1"
    if args.train is None and args.model_dir is None and not args.sagemaker:
        # `docker run IMAGE train` (ENTRYPOINT ["o2v"]) passes no flags: SageMaker layout.
        log.info("no --train or --model-dir given: using the SageMaker layout under %s", args.ml_root)
        args.sagemaker = True
    if args.sagemaker:
        _sagemaker_paths(args)
    if args.train is None:
        raise UsageError("--train is required (or --sagemaker with <ml-root>/input/data/train)")
    if args.model_dir is None:
        raise UsageError("--model-dir is required")
    config = load_hyperparameters(args.hyperparameters, args.hp)
    log.info("Final configuration:\n%s", format_config(config))
    data = {name: read_channel(path, config, name=name)
            for name in ("train", "validation", "test")
            if (path := getattr(args, name)) is not None}
    pretrained = (None, None)
    needs_aux = any(e.pretrained_embedding_file for e in config.encoders)
    if needs_aux:
        if args.auxiliary is None:
            raise UsageError("a pretrained_embedding_file is set but no --auxiliary channel was given")
        pretrained = read_auxiliary(args.auxiliary, config)
    for name, d in data.items():
        log.info("%s channel: %d records from %s", name, len(d), d.source)
    result = train(config, data["train"], validation=data.get("validation"), test=data.get("test"),
                   pretrained=pretrained, model_dir=args.model_dir, seed=args.seed,
                   resume=args.resume, host=args.host,
                   emit=lambda line: print(line, flush=True),
                   progress=False if args.no_progress else None)
    summary = {"model_dir": str(result.model_dir), "epochs_run": result.epochs_run,
               "best_epoch": result.best_epoch, "stopped_early": result.stopped_early}
    if result.history:
        summary["last_epoch"] = {k: v for k, v in result.history[-1].items() if k != "epoch"}
    if result.test_metrics:
        summary["test"] = result.test_metrics
    print("Training finished: " + json.dumps(summary, sort_keys=True), flush=True)
    return 0


# --------------------------------------------------------------------------- evaluate

def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="print a saved model's metrics on a labelled JSON Lines file",
                       description="Score a labelled JSON Lines file (or directory) with a saved "
                                   "model and print SageMaker's metrics as JSON.")
    p.add_argument("--model-dir", type=Path, required=True, help="a directory written by `o2v train`")
    p.add_argument("--data", type=Path, required=True, help="labelled JSON Lines file or directory")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .train import evaluate

    metrics = evaluate(args.model_dir, args.data)
    print(json.dumps(metrics, sort_keys=True), flush=True)
    return 0


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="o2v", description="Object2Vec (Amazon SageMaker's pair-embedding algorithm) in JAX/Flax.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    from . import transform

    transform.add_parser(sub)
    from . import server

    server.add_parser(sub)
    from . import demo

    demo.add_parser(sub)
    data = sub.add_parser("data", help="prepare real datasets as Object2Vec JSON Lines channels",
                          description="Prepare real datasets as Object2Vec JSON Lines channels.")
    data_sub = data.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    from . import movielens

    movielens.add_parser(data_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Python block-buffers stdout into a pipe or file, as in a SageMaker container, where
    # HPO reads #quality_metric lines from the log while the job runs: every line leaves now.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from .checkpoint import ModelDirError
    from .config import HyperparameterError
    from .data import DataError

    try:
        return args.func(args)
    except (UsageError, HyperparameterError, DataError, ModelDirError, FileNotFoundError) as e:
        message = str(e)
        print(f"o2v {args.command}: error: {message}", file=sys.stderr)
        if getattr(args, "sagemaker", False):
            # SageMaker reports the contents of /opt/ml/output/failure as the job's reason.
            failure = args.ml_root / "output" / "failure"
            try:
                failure.parent.mkdir(parents=True, exist_ok=True)
                failure.write_text(message + "\n")
            except OSError:
                pass
        return 2
    except KeyboardInterrupt:
        print(f"o2v {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
