"""The `offsite` command: a thin shell over the library. Every command is one library call."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from typing import Any, Callable

from offsite import allocator
from offsite.config import SplitConfig
from offsite.errors import OffsiteError

EXAMPLE = """example (model owner, then data owner, then model owner):
  offsite emulate MODEL -o bundle --emulator-layers 8
  offsite tune bundle --data train.jsonl --eval-data val.jsonl -o adapter
  offsite plug MODEL adapter -o plugged
  offsite eval plugged --data test.jsonl"""


def _split_flags(parser: argparse.ArgumentParser, default_emulator_layers: int | None = None) -> None:
    group = parser.add_argument_group("split")
    group.add_argument("--bottom", type=int, default=2, help="adapter layers at the bottom (default 2)")
    group.add_argument("--top", type=int, default=2, help="adapter layers at the top (default 2)")
    size = group.add_mutually_exclusive_group()
    size.add_argument("--emulator-layers", type=int, default=default_emulator_layers,
                      help="middle layers the emulator keeps (K; default: all, or 8 in the demo)")
    size.add_argument("--drop-ratio", type=float, help="fraction of middle layers to drop")
    group.add_argument("--method", "--emulator-method", default="uniform",
                       help="how the emulator is made: uniform or similarity, optionally +share and +lowrank or "
                            "+int8 (e.g. similarity+share; default uniform)")
    group.add_argument("--rank-fraction", type=float, default=0.5,
                       help="lowrank: share of each emulator weight's parameters the factors keep (default 0.5)")
    group.add_argument("--calibration", metavar="CORPUS",
                       help="similarity: text the layer similarities are measured on (default: the --distill corpus)")


def _split_config(args: argparse.Namespace, emulator_layers: int | None) -> SplitConfig:
    return SplitConfig(bottom=args.bottom, top=args.top, emulator_layers=emulator_layers, drop_ratio=args.drop_ratio,
                       method=args.method, rank_fraction=args.rank_fraction, calibration=args.calibration)


def _distill_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distillation (optional): train the emulator to match the full middle block")
    group.add_argument("--distill", metavar="CORPUS", help="text corpus: .txt/.jsonl file or built-in name (austen)")
    group.add_argument("--distill-steps", type=int, default=200)
    group.add_argument("--distill-lr", type=float, default=1e-4)
    group.add_argument("--distill-batch-size", type=int, default=4)
    group.add_argument("--distill-seq-len", type=int, default=256)
    group.add_argument("--distill-eval-every", type=int, default=50,
                       help="steps between held-out checks and checkpoints")
    group.add_argument("--kd-weight", type=float, default=1.0, help="weight of the normalised MSE to the full block")
    group.add_argument("--lm-weight", type=float, default=1.0, help="weight of the language-modelling loss")
    group.add_argument("--align", choices=["final", "per-layer"], default="final",
                       help="match only the emulator's output, or every kept layer's")


_DISTILL_FLAG_DEFAULTS = {"distill_steps": None, "distill_lr": 1e-4, "distill_batch_size": 4, "distill_seq_len": 256,
                          "distill_eval_every": 50, "kd_weight": 1.0, "lm_weight": 1.0, "align": "final"}


def _distill_config(args: argparse.Namespace):
    from offsite.config import DistillConfig
    if not args.distill:
        return None
    return DistillConfig(corpus=args.distill, steps=args.distill_steps, lr=args.distill_lr,
                         batch_size=args.distill_batch_size, seq_len=args.distill_seq_len,
                         kd_weight=args.kd_weight, lm_weight=args.lm_weight, align=args.align,
                         eval_every=args.distill_eval_every)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offsite", description="Offsite-Tuning: transfer learning without "
                                     "sharing the full model or the private data.", epilog=EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("--allocator", choices=allocator.CHOICES, default=None,
                        help="memory allocator for training processes: tcmalloc lowers peak memory and is faster; "
                             f"auto uses it where found (default: ${allocator.ENV} or auto)")
    # The same flags after the command name; SUPPRESS keeps them from resetting the ones given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--allocator", choices=allocator.CHOICES, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_command = functools.partial(commands.add_parser, parents=[common])

    emulate = add_command("emulate", help="model owner: build a bundle (adapter + emulator)")
    emulate.add_argument("model", help="full model: local directory, hub id or built-in alias")
    emulate.add_argument("-o", "--output", required=True, help="bundle directory to write")
    _split_flags(emulate)
    _distill_flags(emulate)
    emulate.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    tune = add_command("tune", help="data owner: train the adapter of a bundle")
    tune.add_argument("bundle", help="bundle directory from `offsite emulate`")
    tune.add_argument("--data", required=True, help="training data (.txt or .jsonl)")
    tune.add_argument("-o", "--output", required=True, help="adapter directory to write")
    tune.add_argument("--eval-data", help="validation data; the best checkpoint by its metric is kept")
    tune.add_argument("--lora-rank", type=int, help="train LoRA of this rank in the adapter layers (merged on export)")
    tune.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 2 x rank)")
    steps = tune.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    steps.add_argument("--max-steps", type=int, help="optimizer steps")
    tune.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    tune.add_argument("--weight-decay", type=float, default=0.0)
    tune.add_argument("--warmup-ratio", type=float, default=0.06, help="share of steps spent warming up")
    tune.add_argument("--batch-size", type=int, default=8)
    tune.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    tune.add_argument("--seq-len", type=int, default=256, help="maximum tokens per sequence")
    tune.add_argument("--eval-every", type=int, help="validate every N steps (default: 5 times per run)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--cache-emulator", action="store_true",
                      help="top-only adapter (bundle made with --bottom 0): run the emulator once per sequence "
                           "and reuse its output in later epochs")
    tune.add_argument("--checkpoint-emulator", action="store_true",
                      help="recompute the emulator's activations in the backward pass instead of keeping them: "
                           "less memory, about one more emulator forward per step")
    tune.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    plug = add_command("plug", help="model owner: put a returned adapter into the full model")
    plug.add_argument("model", help="the full model the bundle was made from")
    plug.add_argument("adapter", help="adapter directory from `offsite tune`")
    plug.add_argument("-o", "--output", required=True, help="plugged model directory to write")
    plug.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    evaluate = add_command("eval", help="perplexity or choice accuracy of a model, bundle or plugged model")
    evaluate.add_argument("model", help="full model, bundle or plugged model")
    evaluate.add_argument("--data", required=True, help="evaluation data (.txt or .jsonl)")
    evaluate.add_argument("--adapter", help="apply this adapter file in memory first")
    evaluate.add_argument("--seq-len", type=int, default=512, help="window length in tokens")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--limit", type=int, help="score only the first N examples (or documents)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    info = add_command("info", help="describe a bundle, adapter or model directory")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    demo = add_command("demo", help="the paper's Table 1 on the built-in model, with a report")
    demo.add_argument("--model", default="smollm2-135m", help="full model (default: the built-in smollm2-135m)")
    demo.add_argument("--out", default="offsite-demo", help="report directory (default ./offsite-demo)")
    _split_flags(demo, default_emulator_layers=8)
    demo.add_argument("--tasks", nargs="+", default=["bbc-news", "wordnet", "austen"], help="built-in tasks")
    demo.add_argument("--quick", action="store_true", help="small budget: the whole run in under 10 minutes")
    _distill_flags(demo)
    demo.set_defaults(distill_steps=None)  # None: the budget's distillation (see README)
    demo.add_argument("--no-distill", action="store_true", help="measure the plain emulator, without distillation")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--lr", type=float, help="adapter learning rate for every task (default: the budget's)")
    demo.add_argument("--lora-rank", type=int, help="train the adapter through LoRA of this rank")
    demo.add_argument("--weight-decay", type=float, help="AdamW weight decay of the adapter")

    ablate = add_command("ablate", help="emulator methods side by side on one task, at equal emulator bytes")
    ablate.add_argument("--model", default="smollm2-135m", help="full model (default: the built-in smollm2-135m)")
    ablate.add_argument("--task", default="wordnet", help="built-in task (default wordnet)")
    ablate.add_argument("--methods", nargs="+",
                        help="emulator methods as --method of emulate, '+distill' to distil with --distill "
                             "(default: uniform uniform+distill similarity share lowrank int8)")
    ablate.add_argument("--out", default="offsite-ablate", help="report directory (default ./offsite-ablate)")
    ablate.add_argument("--bottom", type=int, default=2)
    ablate.add_argument("--top", type=int, default=2)
    ablate.add_argument("--emulator-layers", type=int, default=8,
                        help="the byte budget: a uniform emulator with this many layers (default 8)")
    ablate.add_argument("--rank-fraction", type=float, default=0.5)
    ablate.add_argument("--calibration", default="austen", help="similarity: corpus (default austen)")
    _distill_flags(ablate)
    ablate.set_defaults(distill="austen")  # the '+distill' methods need a corpus
    ablate.add_argument("--quick", action="store_true", help="the demo's small budget")
    ablate.add_argument("--seed", type=int, default=0)

    bench = add_command("bench", help="training speed and memory: full fine-tuning against offsite-tuning")
    bench.add_argument("model", nargs="?", help="full model: local directory, hub id or built-in alias")
    bench.add_argument("--random-shape", help="instead of MODEL, a random-weight model of this shape: gpt2-large")
    bench.add_argument("--task", default="choice", help="choice (loss on the answer token) or lm (every token)")
    _split_flags(bench, default_emulator_layers=8)
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--seq-len", type=int, default=160, help="tokens per sequence (default 160)")
    bench.add_argument("--steps", type=int, default=10, help="timed steps per setting (default 10)")
    bench.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (default 2)")
    bench.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA settings (default 8)")
    bench.add_argument("--epochs", type=int, default=3, help="epochs of offsite_top_cached (default 3)")
    bench.add_argument("--settings", nargs="+",
                       help="run only these settings (default: the five main ones); the variants "
                            "offsite_emulator_grads, offsite_all_logits, offsite_checkpointed, "
                            "offsite_lora_checkpointed, offsite_top and offsite_top_cached_lora each undo or add "
                            "one optimisation, to measure it")
    bench.add_argument("--eval-examples", type=int, default=20, help="choice-scoring benchmark size; 0 skips it")
    bench.add_argument("--threads", type=int, help="torch threads per measuring process (default: torch's)")
    bench.add_argument("--in-process", action="store_true",
                       help="run every setting in this process (faster start; peak memory is then not per setting)")
    bench.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    data = add_command("data", help="built-in datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    export = data_commands.add_parser("export", help="write a built-in dataset as jsonl")
    export.add_argument("name", help="bbc-news, wordnet or austen, optionally with :train, :validation or :test")
    export.add_argument("-o", "--output", required=True, help="jsonl file to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    add_command("setup-assets", help="build the built-in model cache and fetch the built-in data")
    return parser


def _run_demo(args: argparse.Namespace) -> None:
    from offsite.demo import DemoConfig, demo
    emulator_layers = None if args.drop_ratio is not None else args.emulator_layers
    split = _split_config(args, emulator_layers)
    overrides = {name: value for name, value in
                 {"lr": args.lr, "lora_rank": args.lora_rank, "weight_decay": args.weight_decay}.items()
                 if value is not None}
    out = demo(DemoConfig(model=args.model, output=args.out, split=split, tasks=args.tasks, quick=args.quick,
                          seed=args.seed, distill=_demo_distill(args), adapter_training=overrides))
    print((out / "report.md").read_text())
    print(f"report written to {out / 'report.md'}, {out / 'report.json'} and {out / 'report.png'}")


def _demo_distill(args: argparse.Namespace):
    """None with --no-distill; the budget's distillation unless a distillation flag was given."""
    from offsite.demo import DISTILL_BUDGETS
    if args.no_distill:
        return None
    budget = DISTILL_BUDGETS["quick" if args.quick else "default"]
    given = {name: getattr(args, name) for name in ("distill_steps", "distill_lr", "distill_batch_size",
                                                      "distill_seq_len", "distill_eval_every", "kd_weight",
                                                      "lm_weight", "align")}
    if args.distill is None and given == _DISTILL_FLAG_DEFAULTS:
        return "budget"
    args.distill = args.distill or budget.corpus
    args.distill_steps = args.distill_steps or budget.steps
    return _distill_config(args)


def _run_ablate(args: argparse.Namespace) -> None:
    from offsite.ablate import AblateConfig, ablate
    methods = args.methods or AblateConfig().methods
    out = ablate(AblateConfig(model=args.model, task=args.task, methods=methods, output=args.out,
                              bottom=args.bottom, top=args.top, emulator_layers=args.emulator_layers,
                              rank_fraction=args.rank_fraction, calibration=args.calibration,
                              distill=_distill_config(args), quick=args.quick,
                              seed=args.seed))
    print((out / "ablate.md").read_text())
    print(f"report written to {out / 'ablate.md'}, {out / 'ablate.json'} and {out / 'ablate.png'}")


def _run_data(args: argparse.Namespace) -> None:
    from offsite.data import read_data, write_jsonl
    from offsite.files import check_output_file
    from offsite.tasks import is_builtin
    if not is_builtin(args.name):
        from offsite.tasks import BUILTIN
        raise OffsiteError(f"'{args.name}' is not a built-in dataset; available: {', '.join(BUILTIN)}")
    output = check_output_file(args.output, args.overwrite)
    data = read_data(args.name, flag="NAME")
    print(f"wrote {write_jsonl(data, output)} ({data.source})")


def _run_bench(args: argparse.Namespace) -> None:
    from offsite.bench import SETTINGS, BenchConfig, bench, format_bench
    split = _split_config(args, None if args.drop_ratio is not None else args.emulator_layers)
    result = bench(BenchConfig(
        model=args.model, random_shape=args.random_shape, task=args.task, split=split, batch_size=args.batch_size,
        seq_len=args.seq_len, steps=args.steps, warmup_steps=args.warmup_steps, lora_rank=args.lora_rank,
        epochs=args.epochs, settings=args.settings or list(SETTINGS), eval_examples=args.eval_examples,
        threads=args.threads, isolate=not args.in_process))
    print(json.dumps(result) if args.json else format_bench(result))


def _run_setup_assets(args: argparse.Namespace) -> None:
    from offsite.assets import setup_assets
    for name, path in setup_assets().items():
        print(f"{name}: {path}")


def _run_emulate(args: argparse.Namespace) -> None:
    from offsite import EmulateConfig, emulate
    split = _split_config(args, args.emulator_layers)
    path = emulate(EmulateConfig(model=args.model, output=args.output, split=split, distill=_distill_config(args),
                                 overwrite=args.overwrite))
    print(f"bundle written to {path}; send it to the data owner")


def _run_tune(args: argparse.Namespace) -> None:
    from offsite import TrainConfig, TuneConfig, tune
    settings = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    path = tune(TuneConfig(bundle=args.bundle, data=args.data, output=args.output, eval_data=args.eval_data,
                           train=settings, overwrite=args.overwrite))
    print(f"adapter written to {path}; return it to the model owner")


def _run_plug(args: argparse.Namespace) -> None:
    from offsite import PlugConfig, plug
    path = plug(PlugConfig(model=args.model, adapter=args.adapter, output=args.output, overwrite=args.overwrite))
    print(f"plugged model written to {path}")


def _run_eval(args: argparse.Namespace) -> None:
    from offsite import EvalConfig, evaluate
    result = evaluate(EvalConfig(model=args.model, data=args.data, adapter=args.adapter, seq_len=args.seq_len,
                                 batch_size=args.batch_size, limit=args.limit))
    _print(result, args.json)


def _run_info(args: argparse.Namespace) -> None:
    from offsite import describe
    _print(describe(args.path), args.json)


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
        print(f"{key}: {value}")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "emulate": _run_emulate, "tune": _run_tune, "plug": _run_plug, "eval": _run_eval, "info": _run_info,
    "demo": _run_demo, "data": _run_data, "setup-assets": _run_setup_assets, "bench": _run_bench,
    "ablate": _run_ablate,
}


def _configure_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="offsite: %(message)s", stream=sys.stderr)
    logging.getLogger("offsite").setLevel(level)
    if not debug:
        # Our own messages and progress bars are enough; the libraries' repeat them.
        from huggingface_hub.utils import logging as hub_logging
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        hub_logging.set_verbosity_error()


_RESTARTED = "OFFSITE_RESTARTED"


def _restart_with_allocator() -> None:
    """Run this command again in a process started with the chosen allocator, if it is not running with it.

    Only the installed `offsite` command does this (`main()` without argv), never a library caller.
    """
    extra = allocator.preload_environment()
    if extra and _RESTARTED not in os.environ:  # once: if the preload did not take, carry on without it
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **extra, _RESTARTED: "1"})


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.allocator is not None:
            os.environ[allocator.ENV] = args.allocator  # the processes offsite spawns see the choice too
        if argv is None:
            _restart_with_allocator()  # before logging is set up: that imports transformers
        _configure_logging(args.debug, args.quiet)
        logging.getLogger("offsite").debug("allocator: %s", allocator.active())
        COMMANDS[args.command](args)
    except OffsiteError as error:
        if args.debug:
            raise
        print(f"offsite {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"offsite {args.command}: interrupted; no partial output was left behind", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the user gets one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"offsite {args.command}: unexpected error: {type(error).__name__}: {error} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
