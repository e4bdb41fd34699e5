"""The `offsite` command: a thin shell over the library. Every command is one call into `offsite.api` or a study.

Flags, their defaults and their help come from the config dataclasses' fields (`offsite.config.option`),
so a default is written once. torch is imported only once a command runs: `--help` and the
allocator restart stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import typing
from typing import Any, Callable

from offsite import allocator
from offsite.config import (
    AlignConfig,
    DistillConfig,
    EmulateConfig,
    DeviceConfig,
    EvalConfig,
    ExportConfig,
    FederateConfig,
    KeygenConfig,
    ServeConfig,
    PlugConfig,
    SampleConfig,
    SplitConfig,
    TrainConfig,
    TuneConfig,
    flag,
)
from offsite.errors import ConfigError, OffsiteError
from offsite.files import one_line
from offsite.studies.bench.settings import BenchConfig
from offsite.studies.settings import DISTILL_BUDGETS, VISION_DISTILL, AblateConfig, DemoConfig, VisionDemoConfig

EXAMPLE = """example (model owner, then data owner, then model owner):
  offsite emulate MODEL -o bundle --emulator-layers 8
  offsite tune bundle --data train.jsonl --eval-data val.jsonl -o adapter
  offsite plug MODEL adapter -o plugged
  offsite eval plugged --data test.jsonl"""


# --- flags from config dataclasses ---------------------------------------------------------------

def _options(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _flags(field: dataclasses.Field) -> tuple[str, ...]:
    return tuple(field.metadata.get("flags") or (flag(field.name),))


def _dest(field: dataclasses.Field) -> str:
    """The argparse destination: from the flag, so fields of two configs in one command never collide."""
    if field.metadata.get("positional"):
        return field.name
    long = next(name for name in _flags(field) if name.startswith("--"))
    return long.lstrip("-").replace("-", "_")


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of `cls`, without building a `cls` (which may need required fields)."""
    return _field_default(next(f for f in dataclasses.fields(cls) if f.name == name))


def add_options(parser: Any, cls: type, defaults: Any = None, only: tuple[str, ...] | None = None,
                unset: str | None = None) -> None:
    """Add a flag for every `option()` field of `cls` to `parser` (a parser or an argument group).

    `defaults`: a `cls` instance whose values replace the fields' defaults (e.g. the demo's split).
    `unset`: every default becomes None, and the help says what None means (e.g. "the budget's").
    """
    hints = typing.get_type_hints(cls)
    exclusive: dict[str, Any] = {}
    for field in _options(cls):
        if only is not None and field.name not in only:
            continue
        meta = field.metadata
        default = None if unset else getattr(defaults, field.name) if defaults is not None else _field_default(field)
        kind = hints[field.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        kwargs: dict[str, Any] = {"help": _help(meta["help"], default, unset, base)}
        if base is bool:
            kwargs["action"] = "store_false" if default is True else "store_true"
        else:
            kwargs["type"] = str if typing.get_origin(base) is list else base
            for key in ("choices", "metavar", "nargs"):
                if key in meta:
                    kwargs[key] = meta[key]
        if meta.get("positional"):
            target = parser
            if default is not dataclasses.MISSING:
                kwargs["default"] = default
            target.add_argument(field.name, **kwargs)
            continue
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        target = parser
        if "exclusive" in meta:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = exclusive[meta["exclusive"]]
        target.add_argument(*_flags(field), dest=_dest(field), **kwargs)


def _help(text: str, default: Any, unset: str | None, kind: Any) -> str:
    if unset:
        return f"{text} (default: {unset})"
    if default is None or default == [] or default is dataclasses.MISSING or kind is bool or "default" in text:
        return text
    shown = " ".join(default) if isinstance(default, list) else default
    return f"{text} (default {shown})"


def from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """`cls` from the flags `add_options` added (those not added keep their defaults), and `values`."""
    given = {f.name: getattr(args, _dest(f)) for f in _options(cls) if hasattr(args, _dest(f))}
    return cls(**{**given, **values})


def _given(cls: type, args: argparse.Namespace, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The fields of `cls` (or those in `only`) whose flags were given: added with `unset`, so None is not given."""
    return {f.name: getattr(args, _dest(f)) for f in _options(cls)
            if (only is None or f.name in only) and getattr(args, _dest(f), None) is not None}


def _split(args: argparse.Namespace) -> SplitConfig:
    # --drop-ratio replaces a command's default K (the demo's and bench's 8)
    emulator_layers = None if args.drop_ratio is not None else args.emulator_layers
    return from_args(SplitConfig, args, emulator_layers=emulator_layers)


def _split_flags(parser: argparse.ArgumentParser, defaults: SplitConfig | None = None) -> None:
    add_options(parser.add_argument_group("split"), SplitConfig, defaults)


def _distill_flags(parser: argparse.ArgumentParser, defaults: DistillConfig | None = None,
                   unset: str | None = None,
                   title: str = "distillation (optional): train the emulator to match the full middle block") -> None:
    """The distillation flags; by default without a corpus, which means no distillation."""
    group = parser.add_argument_group(title)
    add_options(group, DistillConfig, defaults or DistillConfig(corpus=None), unset=unset)  # type: ignore[arg-type]


def _device_flags(parser: argparse.ArgumentParser, what: str = "") -> None:
    add_options(parser.add_argument_group(f"device and precision {what}".strip()), DeviceConfig)


def _distill(args: argparse.Namespace) -> DistillConfig | None:
    return from_args(DistillConfig, args) if args.distill else None


# TrainConfig fields each data owner's round of `federate` takes (its steps are --local-steps)
FEDERATE_TRAIN_FLAGS = ("lr", "weight_decay", "warmup_ratio", "batch_size", "grad_accum", "seq_len", "lora_rank",
                        "lora_alpha", "seed", "proximal_mu", "checkpoint_emulator")

# A round's alignment is short: it runs between every two rounds, while the owners wait.
FEDERATE_ALIGNMENT = DistillConfig(corpus=None, steps=20, eval_every=20)  # type: ignore[arg-type]

# TrainConfig fields the demo lets a flag replace for every task's adapter (its own --seed is the demo's)
DEMO_ADAPTER_FLAGS = ("lr", "lora_rank", "weight_decay")
VISION_ADAPTER_FLAGS = ("lr", "weight_decay", "head_lr_scale")


# --- the parser ----------------------------------------------------------------------------------

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
    add_options(emulate, EmulateConfig, only=("model", "output"))
    _split_flags(emulate)
    _distill_flags(emulate)
    add_options(emulate, EmulateConfig, only=("overwrite", "sign"))
    add_options(emulate.add_argument_group("large models"), EmulateConfig,
                only=("stream", "max_shard_size", "num_processes", "shard_full_model"))
    _device_flags(emulate, "of distillation")

    tune = add_command("tune", help="data owner: train the adapter of a bundle")
    add_options(tune, TuneConfig, only=("bundle", "data", "output", "eval_data"))
    add_options(tune, TrainConfig)
    add_options(tune, TuneConfig, only=("checkpoint_every", "trust", "sign", "overwrite"))
    add_options(tune, TuneConfig, only=("init_adapter",))
    _device_flags(tune)
    add_options(tune, TuneConfig, only=("save_dtype", "num_processes"))

    align = add_command("align", help="model owner: re-distil a bundle's emulator with a returned adapter in the "
                                      "loop, so the next round of tuning transfers better")
    add_options(align, AlignConfig, only=("bundle", "model", "adapter", "output"))
    _distill_flags(align)  # --distill is required: _run_align says so
    add_options(align, AlignConfig, only=("trust", "sign", "overwrite", "num_processes", "shard_full_model"))
    _device_flags(align)

    add_options(add_command("plug", help="model owner: put a returned adapter into the full model"), PlugConfig)

    federate = add_command("federate", help="model owner and data owners: train one adapter over many owners' data "
                                            "through Flower (simulated on this machine)")
    add_options(federate, FederateConfig, only=("bundle", "client_data", "output", "rounds", "local_steps",
                                                "strategy", "server_lr"))
    add_options(federate.add_argument_group("privacy"), FederateConfig, only=("secagg", "dp_noise", "dp_clip", "dp_delta"))
    add_options(federate.add_argument_group("the model owner's evaluation after every round"), FederateConfig,
                only=("eval_data", "model", "eval_limit"))
    add_options(federate.add_argument_group("each data owner's training in a round"), TrainConfig,
                only=FEDERATE_TRAIN_FLAGS)
    _distill_flags(federate, FEDERATE_ALIGNMENT, title="per-round emulator alignment (optional, FedBiOT's server "
                   "step): after each round the model owner re-distils the emulator on --distill CORPUS with the "
                   "global adapter in the loop (needs --model) and sends it with the next round's adapter")
    add_options(federate, FederateConfig, only=("min_clients", "client_cpus", "round_timeout", "overwrite"))
    _device_flags(federate, "of the owners' training and the server's scoring")
    federate.add_argument("--write-app", metavar="DIR", help="instead of simulating: write the Flower App project "
                          "for the deployment runtime (`flwr run DIR SUPERLINK`) with these settings; needs "
                          "--min-clients, and each data owner's SuperNode gets its own bundle and data (see "
                          "docs/federation.md)")

    evaluate = add_command("eval", help="perplexity or choice accuracy of a model, bundle or plugged model")
    add_options(evaluate, EvalConfig)
    _device_flags(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    info = add_command("info", help="describe a bundle, adapter or model directory")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    demo = add_command("demo", help="the paper's Table 1 on the built-in model, with a report")
    add_options(demo, DemoConfig, only=("model", "output"))
    _split_flags(demo, default_of(DemoConfig, "split"))
    add_options(demo, DemoConfig, only=("tasks", "quick"))
    _distill_flags(demo, unset="the budget's")
    demo.add_argument("--no-distill", action="store_true", help="measure the plain emulator, without distillation")
    add_options(demo, DemoConfig, only=("seed", "compare_uniform", "fair_budget"))
    add_options(demo.add_argument_group("standard evaluation"), DemoConfig, only=("lm_eval", "lm_eval_limit"))
    add_options(demo, TrainConfig, only=DEMO_ADAPTER_FLAGS, unset="the budget's")
    _device_flags(demo, "of every stage")

    vision = add_command("demo-vision", help="the paper's vision Table 1: the built-in ViT on classes it never saw")
    add_options(vision, VisionDemoConfig, only=("model", "output"))
    _split_flags(vision, default_of(VisionDemoConfig, "split"))
    add_options(vision, VisionDemoConfig, only=("task", "quick"))
    _distill_flags(vision, unset="the budget's")
    vision.add_argument("--no-distill", action="store_true", help="measure the plain emulator, without distillation")
    add_options(vision, VisionDemoConfig, only=("seed",))
    add_options(vision, TrainConfig, only=VISION_ADAPTER_FLAGS, unset="the budget's")
    _device_flags(vision, "of every stage")

    ablate = add_command("ablate", help="emulator methods side by side on one task, at equal emulator bytes")
    add_options(ablate, AblateConfig)
    _distill_flags(ablate, default_of(AblateConfig, "distill"))  # the '+distill' methods need a corpus
    _device_flags(ablate, "of every stage")

    bench = add_command("bench", help="training speed and memory: full fine-tuning against offsite-tuning")
    add_options(bench, BenchConfig, only=("model", "random_shape", "task"))
    _split_flags(bench, default_of(BenchConfig, "split"))
    add_options(bench, BenchConfig, only=("batch_size", "seq_len", "steps", "warmup_steps", "lora_rank", "epochs",
                                          "settings", "eval_examples", "threads", "isolate"))
    _device_flags(bench, "of the timed settings (the cached ones run on the CPU)")
    bench.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    serve = add_command("serve", help="model owner: the service (bundles out, adapters in, every customer's plugged "
                                      "model served from one full model)")
    add_options(serve, ServeConfig)
    serve.add_argument("--add-customer", metavar="NAME", help="register a customer in --state and print its token "
                       "(shown once; only a salted hash is kept), then exit")

    remote = add_command("remote", help="data owner: use a model owner's service (download a bundle, upload an "
                                        "adapter, generate or score through it)")
    remote.add_argument("--url", default="http://127.0.0.1:8000", help="the service's address (default: %(default)s)")
    remote.add_argument("--token", help="your token (default: $OFFSITE_TOKEN)")
    actions = remote.add_subparsers(dest="remote_command", required=True, metavar="ACTION")
    actions.add_parser("bundles", help="the bundles you may download")
    actions.add_parser("adapters", help="your uploaded adapters")
    download = actions.add_parser("download", help="download a bundle (resumable; checked against its manifest)")
    download.add_argument("bundle")
    download.add_argument("-o", "--output", required=True, help="folder to write the bundle to")
    push = actions.add_parser("upload", help="upload an adapter file trained on one of the service's bundles")
    push.add_argument("adapter")
    push.add_argument("--bundle", required=True, help="the bundle it was trained on")
    complete = actions.add_parser("complete", help="greedy generation through the full model with your adapter")
    complete.add_argument("adapter_id")
    complete.add_argument("prompt")
    complete.add_argument("--max-tokens", type=int, default=16)
    rank = actions.add_parser("score", help="log-likelihood of continuations after a prompt, through your adapter")
    rank.add_argument("adapter_id")
    rank.add_argument("prompt")
    rank.add_argument("continuations", nargs="+")

    harness = add_command("lm-eval", help="lm-eval's command line with the `offsite` model type (--model offsite "
                                          "--model_args pretrained=PATH[,adapter=A][,bundle=B]); needs the lm-eval "
                                          "extra; every argument after it is lm-eval's", add_help=False)

    data = add_command("data", help="built-in datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    add_options(data_commands.add_parser("export", help="write a built-in dataset as jsonl"), ExportConfig)
    sample = data_commands.add_parser("sample", help="model owner: a distillation corpus sampled from the full model")
    add_options(sample, SampleConfig)
    _device_flags(sample)

    assets = add_command("setup-assets", help="build the built-in model cache and fetch the built-in data")
    assets.add_argument("--vision", action="store_true",
                        help="also pretrain the built-in vision model (a ViT on Fashion-MNIST, once; see "
                             "docs/encoders.md)")
    add_options(add_command("keygen", help="make a key pair to sign bundles or adapter files (--sign, --trust)"),
                KeygenConfig)
    return parser


# --- the commands: each one library call ---------------------------------------------------------
# The library is imported inside each command, not at the top: it loads torch, which --help and
# the allocator's restart do not need.

def _run_emulate(args: argparse.Namespace) -> None:
    config = from_args(EmulateConfig, args, split=_split(args), distill=_distill(args),
                       runtime=from_args(DeviceConfig, args))
    if _launched_here(args, config.num_processes):
        return
    from offsite.api import emulate  # noqa: PLC0415 - lazy torch (see above)
    path = emulate(config)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        print(f"bundle written to {path}; send it to the data owner")


def _launched_here(args: argparse.Namespace, count: int) -> bool:
    """With --num-processes N > 1 and no launcher yet: run this command in N processes (through accelerate's
    launcher) and return True; the main process prints what was written."""
    from offsite import parallel  # noqa: PLC0415 - lazy torch (see above)
    if count <= 1 or parallel.launched():
        return False
    if os.environ.get(parallel.LAUNCHED):
        raise OffsiteError("--num-processes: the launcher started a single process; see docs/scale.md")
    parallel.launch(args.argv, count)
    return True


def _run_tune(args: argparse.Namespace) -> None:
    config = from_args(TuneConfig, args, train=from_args(TrainConfig, args), runtime=from_args(DeviceConfig, args))
    if _launched_here(args, config.num_processes):
        return
    from offsite.api import tune  # noqa: PLC0415 - lazy torch (see above)
    path = tune(config)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        print(f"adapter written to {path}; return it to the model owner")


def _run_align(args: argparse.Namespace) -> None:
    if not args.distill:
        raise ConfigError(["--distill CORPUS is required: the public text the emulator is re-aligned on"])
    config = from_args(AlignConfig, args, distill=_distill(args), runtime=from_args(DeviceConfig, args))
    if _launched_here(args, config.num_processes):
        return
    from offsite.api import align  # noqa: PLC0415 - lazy torch (see above)
    path = align(config)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        print(f"re-aligned bundle written to {path}; send it to the data owner with their adapter")


def _run_federate(args: argparse.Namespace) -> None:
    config = from_args(FederateConfig, args, train=from_args(TrainConfig, args), runtime=from_args(DeviceConfig, args),
                       alignment=_distill(args))
    if args.write_app:
        from offsite.federation.app import write_app  # noqa: PLC0415 - lazy torch (see above)
        project = write_app(config, args.write_app)
        print(f"Flower App written to {project}; run it with `flwr run {project.parent} SUPERLINK --stream` "
              "(see docs/federation.md)")
        return
    from offsite.federation.simulation import federate  # noqa: PLC0415 - lazy torch (see above)
    path = federate(config)
    print(f"federated adapter written to {path} (each round in {path}/rounds.jsonl); plug it with `offsite plug`")


def _run_plug(args: argparse.Namespace) -> None:
    from offsite.api import plug  # noqa: PLC0415 - lazy torch (see above)
    print(f"plugged model written to {plug(from_args(PlugConfig, args))}")


def _run_eval(args: argparse.Namespace) -> None:
    config = from_args(EvalConfig, args, runtime=from_args(DeviceConfig, args))
    if not config.lm_eval:
        from offsite.api import evaluate  # noqa: PLC0415 - lazy torch (see above)
        _print(evaluate(config), args.json)
        return
    from offsite.lmeval.evaluate import evaluate_with_lm_eval  # noqa: PLC0415 - lazy torch and lm-eval
    result = evaluate_with_lm_eval(config)
    lm_table = result.pop("lm_eval_table")
    if args.json:
        print(json.dumps(result))
        return
    print(lm_table)
    _print({k: v for k, v in result.items() if k != "lm_eval"}, False)


def _run_info(args: argparse.Namespace) -> None:
    from offsite.api import describe  # noqa: PLC0415 - lazy torch (see above)
    _print(describe(args.path), args.json)


def _run_data(args: argparse.Namespace) -> None:
    if args.data_command == "sample":
        from offsite.api import sample_corpus  # noqa: PLC0415 - lazy torch (see above)
        print(f"wrote {sample_corpus(from_args(SampleConfig, args, runtime=from_args(DeviceConfig, args)))}")
        return
    config = from_args(ExportConfig, args)
    if config.lm_eval:
        from offsite.lmeval.tasks import write_task  # noqa: PLC0415 - lazy torch (see above)
        path = write_task(config.name, config.output, config.overwrite)
        print(f"wrote {path} and {path.with_suffix('.jsonl')} (lm-eval task {path.stem}; score it with "
              f"`offsite eval MODEL --lm-eval {path}`)")
        return
    from offsite.api import export_data  # noqa: PLC0415 - lazy torch (see above)
    path, source = export_data(config)
    print(f"wrote {path} ({source})")


def _run_serve(args: argparse.Namespace) -> None:
    if args.add_customer:
        from offsite.service.run import add_customer  # noqa: PLC0415 - lazy torch (see above)
        token = add_customer(args.state, args.add_customer)
        print(f"customer {args.add_customer} added; its token, shown only now (give it to them): {token}")
        return
    config = from_args(ServeConfig, args)
    from offsite.service.run import serve  # noqa: PLC0415 - lazy torch (see above)
    serve(config)


def _run_remote(args: argparse.Namespace) -> None:
    from offsite.service.client import Remote  # noqa: PLC0415 - lazy torch (see above)
    remote = Remote(args.url, args.token)
    action = args.remote_command
    if action == "download":
        print(f"bundle {args.bundle} written to {remote.download(args.bundle, args.output)} (checked)")
    elif action == "upload":
        found = remote.upload(args.adapter, args.bundle)
        print(f"adapter uploaded: id {found['id']} (bundle {found['bundle']})")
    elif action == "complete":
        print(remote.complete(args.adapter_id, args.prompt, args.max_tokens)["choices"][0]["text"])
    elif action == "score":
        print(json.dumps(remote.score(args.adapter_id, args.prompt, args.continuations)["scores"], indent=2))
    else:
        print(json.dumps(remote.bundles() if action == "bundles" else remote.adapters(), indent=2))


def _run_harness(args: argparse.Namespace) -> None:
    from offsite.lmeval.harness import run_harness  # noqa: PLC0415 - lazy torch and lm-eval
    status = run_harness(args.harness_args)
    if status:
        raise SystemExit(status)


def _run_keygen(args: argparse.Namespace) -> None:
    from offsite.api import keygen  # noqa: PLC0415 - lazy torch (see above)
    private, public = keygen(from_args(KeygenConfig, args))
    print(f"private key written to {private} (keep it; pass it to --sign); public key to {public} "
          "(send it; the other party passes it to --trust)")


def _run_setup_assets(args: argparse.Namespace) -> None:
    from offsite.api import setup_assets  # noqa: PLC0415 - lazy torch (see above)
    for name, path in setup_assets().items():
        print(f"{name}: {path}")
    if args.vision:
        from offsite.studies.vision_model import ensure_vision_model  # noqa: PLC0415 - lazy torch
        print(f"vit-fashion: {ensure_vision_model()}")


def _demo_distill(args: argparse.Namespace, budgets: dict[str, DistillConfig] = DISTILL_BUDGETS
                  ) -> DistillConfig | str | None:
    """None with --no-distill; the budget's distillation, with the distillation flags given replacing its fields."""
    if args.no_distill:
        return None
    given = _given(DistillConfig, args)
    if not given:
        return "budget"
    return dataclasses.replace(budgets["quick" if args.quick else "default"], **given)


def _demo_config(args: argparse.Namespace) -> DemoConfig:
    return from_args(DemoConfig, args, split=_split(args), distill=_demo_distill(args),
                     adapter_training=_given(TrainConfig, args, only=DEMO_ADAPTER_FLAGS),
                     runtime=from_args(DeviceConfig, args))


def _run_demo(args: argparse.Namespace) -> None:
    from offsite.studies.demo import demo  # noqa: PLC0415 - lazy torch (see above)
    out = demo(_demo_config(args))
    print((out / "report.md").read_text())
    print(f"report written to {out / 'report.md'}, {out / 'report.json'} and {out / 'report.png'}")


def _vision_config(args: argparse.Namespace) -> VisionDemoConfig:
    return from_args(VisionDemoConfig, args, split=_split(args), distill=_demo_distill(args, VISION_DISTILL),
                     adapter_training=_given(TrainConfig, args, only=VISION_ADAPTER_FLAGS),
                     runtime=from_args(DeviceConfig, args))


def _run_demo_vision(args: argparse.Namespace) -> None:
    from offsite.studies.vision_demo import vision_demo  # noqa: PLC0415 - lazy torch (see above)
    out = vision_demo(_vision_config(args))
    print((out / "report.md").read_text())
    print(f"report written to {out / 'report.md'} and {out / 'report.json'}")


def _run_ablate(args: argparse.Namespace) -> None:
    from offsite.studies.ablate import ablate  # noqa: PLC0415 - lazy torch (see above)
    out = ablate(from_args(AblateConfig, args, distill=from_args(DistillConfig, args),
                           runtime=from_args(DeviceConfig, args)))
    print((out / "ablate.md").read_text())
    print(f"report written to {out / 'ablate.md'}, {out / 'ablate.json'} and {out / 'ablate.png'}")


def _run_bench(args: argparse.Namespace) -> None:
    from offsite.studies.bench.bench import bench  # noqa: PLC0415 - lazy torch (see above)
    from offsite.studies.bench.table import format_bench  # noqa: PLC0415 - beside bench, which is lazy
    result = bench(from_args(BenchConfig, args, split=_split(args), runtime=from_args(DeviceConfig, args)))
    print(json.dumps(result) if args.json else format_bench(result))


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
    "emulate": _run_emulate, "tune": _run_tune, "align": _run_align, "federate": _run_federate, "plug": _run_plug, "eval": _run_eval,
    "info": _run_info, "demo": _run_demo, "demo-vision": _run_demo_vision, "data": _run_data, "setup-assets": _run_setup_assets, "bench": _run_bench,
    "ablate": _run_ablate, "keygen": _run_keygen, "lm-eval": _run_harness,
    "serve": _run_serve, "remote": _run_remote,
}


def _configure_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="offsite: %(message)s", stream=sys.stderr)
    logging.getLogger("offsite").setLevel(level)
    if quiet:  # `federate` runs Flower, whose own logger reports every round
        logging.getLogger("flwr").setLevel(logging.WARNING)
    if not debug:
        # Our own messages and progress bars are enough; the libraries' repeat them.
        from huggingface_hub.utils import logging as hub_logging  # noqa: PLC0415 - lazy: loads transformers
        from transformers.utils import logging as hf_logging  # noqa: PLC0415 - lazy: loads transformers
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


def _harness_split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(offsite's arguments, lm-eval's) when the command is `lm-eval`: everything after it is lm-eval's, flags
    included (argparse's REMAINDER would refuse a first argument that starts with '-')."""
    position = 0
    while position < len(argv) and argv[position].startswith("-"):
        position += 2 if argv[position] == "--allocator" else 1
    if position < len(argv) and argv[position] == "lm-eval":
        return argv[: position + 1], argv[position + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    ours, harness_args = _harness_split(given)
    args = _build_parser().parse_args(ours)
    if args.command == "lm-eval":
        args.harness_args = harness_args
    args.argv = given  # what `tune --num-processes` hands its launcher
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
        print(f"offsite {args.command}: error: {one_line(str(error), limit=None)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"offsite {args.command}: interrupted; no partial output was left behind (tune and emulate --distill "
              "keep a checkpoint: the same command resumes from it)", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the user gets one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"offsite {args.command}: unexpected error: {type(error).__name__}: {one_line(str(error))} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
