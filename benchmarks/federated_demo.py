"""The federated demo: bbc-news split across data owners, non-IID, on the built-in model.

The demo's bbc-news budget (640 training articles, 150 test articles, batch 8, lr 1e-4, seq-len 160)
is split across `--owners` data owners by a Dirichlet(`--alpha`) draw over each topic (fixed seed),
so each owner holds mostly one or two topics. On one 2-8-2 bundle it measures the plug-in of:
each owner's adapter trained alone, the adapter trained on all data pooled, full fine-tuning on the
pooled data, and the federated adapter (FedAvg; optionally with SecAgg+ and with central DP), with
the federated accuracy after every round in a chart.

    python benchmarks/federated_demo.py --out /tmp/federated            # about 40 min on 2 CPU cores

Writes OUT/federated.json, OUT/federated.md and OUT/federated.png. Stages whose output exists are
reused (delete OUT to measure again).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np

from offsite import EmulateConfig, SplitConfig, TrainConfig, TuneConfig, emulate, tune
from offsite.config import DeviceConfig, DistillConfig, FederateConfig
from offsite.data.read import read_data, write_jsonl
from offsite.data.types import ChoiceData
from offsite.federation.server import ROUNDS
from offsite.federation.simulation import federate
from offsite.studies.settings import BUDGETS
from offsite.studies.stages import evaluate_stage, full_finetune_stage

MODEL = "smollm2-135m"
BUDGET = BUDGETS["default"]["bbc-news"]


def split_owners(data: ChoiceData, owners: int, alpha: float, seed: int) -> list[ChoiceData]:
    """Each topic's articles dealt to the owners in Dirichlet(alpha) shares: small alpha, few topics each."""
    rng = np.random.default_rng(seed)
    shares: list[list] = [[] for _ in range(owners)]
    by_topic: dict[int, list] = {}
    for example in data.examples:
        by_topic.setdefault(example.label, []).append(example)
    for label in sorted(by_topic):
        examples = by_topic[label]
        cuts = (np.cumsum(rng.dirichlet([alpha] * owners)) * len(examples)).astype(int)[:-1]
        for owner, part in enumerate(np.split(np.array(examples, dtype=object), cuts)):
            shares[owner] += list(part)
    for share in shares:
        random.Random(seed).shuffle(share)
    return [ChoiceData(share, f"{data.source} owner {i}") for i, share in enumerate(shares)]


def timed(path: Path, work) -> dict:
    """`work()`'s result, kept in `path` (a rerun reuses it) with its wall time."""
    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = work()
    result = {**result, "wall_seconds": round(time.perf_counter() - start, 1)}
    path.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--owners", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration (smaller: less IID)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dp", type=float, nargs=2, metavar=("NOISE", "CLIP"), default=None,
                        help="also run the federation with central DP (noise multiplier, clipping norm)")
    parser.add_argument("--secagg", action="store_true", help="also run the federation with SecAgg+")
    parser.add_argument("--lr", type=float, default=None, help="the federation's local lr (default: the budget's)")
    parser.add_argument("--no-alone", action="store_true", help="skip the owners-alone rows (e.g. a second split)")
    parser.add_argument("--align", nargs=2, metavar=("CORPUS", "STEPS"), default=None,
                        help="also run the federation with FedBiOT's per-round alignment (federate --distill CORPUS "
                             "--distill-steps STEPS)")
    parser.add_argument("--predistill", nargs=2, metavar=("CORPUS", "STEPS"), default=None,
                        help="control for --align: also federate through a bundle distilled STEPS steps on CORPUS "
                             "beforehand (no adapter in the loop)")
    parser.add_argument("--pooled-lr", type=float, default=None, help="also tune the pooled adapter at this lr")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cpu = DeviceConfig(device="cpu")

    train = ChoiceData(read_data("bbc-news").examples[: BUDGET.train_examples], "bbc-news:train")
    test = ChoiceData(read_data("bbc-news:test").examples[: BUDGET.eval_examples], "bbc-news:test")
    files = {"pooled": write_jsonl(train, out / "pooled.jsonl"), "test": write_jsonl(test, out / "test.jsonl")}
    owners = split_owners(train, args.owners, args.alpha, args.seed)
    owner_files = [str(write_jsonl(o, out / f"owner{i}.jsonl")) for i, o in enumerate(owners)]
    topics = test.examples[0].choices
    composition = [{topics[k]: v for k, v in sorted(Counter(e.label for e in o.examples).items())} for o in owners]

    bundle = out / "bundle-2-8-2"
    if not bundle.exists():
        emulate(EmulateConfig(model=MODEL, output=str(bundle), split=SplitConfig(emulator_layers=8)))
    settings = {"batch_size": BUDGET.batch_size, "seq_len": BUDGET.seq_len, "lr": BUDGET.lr, "seed": args.seed}

    def adapter_row(name: str, data: str, lr: float | None = None) -> dict:
        adapter = out / f"adapter-{name}"
        tune(TuneConfig(bundle=str(bundle), data=data, output=str(adapter), overwrite=True, runtime=cpu,
                        train=TrainConfig(max_steps=BUDGET.steps, **{**settings, "lr": lr or settings["lr"]})))
        return {"plug_in": evaluate_stage(MODEL, str(adapter), str(files["test"]), BUDGET, str(bundle), cpu)}

    rows: dict[str, dict] = {}
    rows["zero-shot"] = timed(out / "zero-shot.json", lambda: {"plug_in": evaluate_stage(
        MODEL, None, str(files["test"]), BUDGET, runtime=cpu)})
    rows["pooled"] = timed(out / "pooled.json", lambda: adapter_row("pooled", str(files["pooled"])))
    if args.pooled_lr:
        rows[f"pooled, lr {args.pooled_lr:g}"] = timed(out / f"pooled-lr{args.pooled_lr:g}.json", lambda: adapter_row(
            f"pooled-lr{args.pooled_lr:g}", str(files["pooled"]), args.pooled_lr))
    for i, path in enumerate([] if args.no_alone else owner_files):
        rows[f"owner {i} alone"] = timed(out / f"owner{i}.json", lambda p=path, i=i: adapter_row(f"owner{i}", p))
    rows["full fine-tuning, pooled"] = timed(out / "full-ft.json", lambda: {"plug_in": full_finetune_stage(
        MODEL, str(files["pooled"]), str(files["test"]), {"max_steps": BUDGET.steps, **settings,
                                                           "lr": BUDGET.full_lr},
        str(out / "full-ft-metrics.jsonl"), runtime=cpu)["result"]})

    variants = {"federated (FedAvg)": {}}
    if args.secagg:
        variants["federated, SecAgg+"] = {"secagg": True}
    if args.dp:
        variants[f"federated, DP (noise {args.dp[0]:g}, clip {args.dp[1]:g})"] = {"dp_noise": args.dp[0],
                                                                              "dp_clip": args.dp[1]}
    if args.align:
        variants[f"federated, aligned each round ({args.align[1]} steps on {args.align[0]})"] = {
            "alignment": DistillConfig(corpus=args.align[0], steps=int(args.align[1]), eval_every=int(args.align[1]))}
    if args.predistill:
        corpus, steps = args.predistill[0], int(args.predistill[1])
        distilled = out / f"bundle-2-8-2-{Path(corpus).stem}{steps}"
        if not distilled.exists():
            emulate(EmulateConfig(model=MODEL, output=str(distilled), split=SplitConfig(emulator_layers=8),
                                  distill=DistillConfig(corpus=corpus, steps=steps, eval_every=steps)))
        variants[f"federated, bundle distilled {steps} steps on {corpus} first"] = {"bundle": str(distilled)}
    curves = {}
    for label, extra in variants.items():
        name = "-".join(["federated", f"r{args.rounds}", f"e{args.local_steps}", *map(_part, extra.items()),
                         *([f"lr{args.lr:g}"] if args.lr else [])])

        def run_federation(name=name, extra=extra) -> dict:
            adapter = out / name
            through = extra.get("bundle", str(bundle))
            extra = {k: v for k, v in extra.items() if k != "bundle"}
            federate(FederateConfig(bundle=through, output=str(adapter), client_data=owner_files,
                                    rounds=args.rounds, local_steps=args.local_steps, eval_data=str(files["test"]),
                                    model=MODEL, overwrite=True, runtime=cpu,
                                    train=TrainConfig(**{**settings, "lr": args.lr or settings["lr"]}),
                                    **extra))
            rounds = [json.loads(line) for line in (adapter / ROUNDS).read_text().splitlines()]
            return {"plug_in": rounds[-1]["eval"], "rounds": rounds}

        rows[label] = timed(out / f"{name}.json", run_federation)
        curves[label] = [r["eval"]["accuracy"] for r in rows[label]["rounds"]]

    report = {"owners": composition, "rounds": args.rounds, "local_steps": args.local_steps, "alpha": args.alpha,
              "budget": BUDGET.__dict__, "rows": rows}
    (out / "federated.json").write_text(json.dumps(report, indent=2))
    lines = [f"bbc-news across {args.owners} owners (Dirichlet alpha {args.alpha}, seed {args.seed}); 2-8-2 uniform "
             f"bundle of {MODEL}; {args.rounds} rounds x {args.local_steps} local steps; test {len(test.examples)} "
             "articles", "", "| setting | plug-in accuracy | wall time |", "|---|---|---|"]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['plug_in']['accuracy']:.3f} | {row['wall_seconds'] / 60:.1f} min |")
    lines += ["", "| owner | articles by topic |", "|---|---|"]
    lines += [f"| {i} | {', '.join(f'{t} {n}' for t, n in c.items())} |" for i, c in enumerate(composition)]
    (out / "federated.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _chart(curves, rows, out / "federated.png")


def _part(setting: tuple) -> str:
    """A variant's setting in its cache file's name."""
    key, value = setting
    if value is True:
        return key
    if isinstance(value, DistillConfig):
        return f"{key}-{Path(value.corpus).stem}{value.steps}"
    if isinstance(value, str):
        return f"{key}-{Path(value).name}"
    return f"{key}{value:g}"


def _chart(curves: dict[str, list[float]], rows: dict[str, dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only for the chart
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, accuracies in curves.items():
        axes.plot(range(len(accuracies)), accuracies, marker="o", label=label)
    alone = [row["plug_in"]["accuracy"] for label, row in rows.items() if label.endswith("alone")]
    lines = [("pooled offsite-tuning", rows["pooled"]["plug_in"]["accuracy"], "--"),
             ("full fine-tuning, pooled", rows["full fine-tuning, pooled"]["plug_in"]["accuracy"], ":"),
             ("zero-shot", rows["zero-shot"]["plug_in"]["accuracy"], (0, (1, 4)))]
    if alone:
        lines.append(("owners alone (mean)", sum(alone) / len(alone), "-."))
    for label, value, style in lines:
        axes.axhline(value, linestyle=style, color="grey", label=f"{label} {value:.3f}")
    axes.set_xlabel("round")
    axes.set_ylabel("plug-in accuracy, bbc-news test")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
