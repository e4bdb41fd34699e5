"""`offsite federate`: many data owners train one adapter through Flower (simulation and deployment runtimes)."""

import json
import math
import os
import socket
import subprocess
import sys
import time
import tomli

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Array, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedProx
from test_bundle import make_bundle
from tiny_models import SAMPLE_TEXT

from offsite import TrainConfig, TuneConfig, tune
from offsite.api import plug
from offsite.cli import main
from offsite.config import DeviceConfig, DistillConfig, FederateConfig, PlugConfig
from offsite.errors import ConfigError, OffsiteError
from offsite.exchange.adapter import extract, load_adapter
from offsite.exchange.bundle import emulator_positions, open_bundle
from offsite.federation.app import config_from_run, run_config, write_app
from offsite.federation.server import ROUNDS, Checked, build_strategy
from offsite.federation.simulation import federate
from offsite.federation.updates import (ARRAYS, EMULATOR, METRICS, WEIGHT, Reference, bundle_adapter, flat, from_record,
                                       to_record)

TRAIN = TrainConfig(lr=1e-2, batch_size=2, seq_len=32)
CPU = DeviceConfig(device="cpu")


def reply(node: int, tensors: dict[str, np.ndarray], examples: int) -> Message:
    """A client's training reply as the server receives it."""
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="i",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in tensors.items()}),
                          METRICS: MetricRecord({WEIGHT: examples, "train-loss": 1.0})})
    return Message(content, metadata=metadata)


REFERENCE = Reference({"layers.0.w": (2, 3), "layers.5.b": (3,)}, "0" * 64, {})


def update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in REFERENCE.shapes.items()}


def test_fedavg_is_the_example_weighted_average_and_fedprox_with_mu_0_the_same():
    updates, examples = [update(s) for s in range(3)], [5, 1, 14]
    by_hand = {k: sum(u[k] * n for u, n in zip(updates, examples)) / sum(examples) for k in REFERENCE.shapes}
    replies = [reply(node, u, n) for node, (u, n) in enumerate(zip(updates, examples), start=11)]
    averaged, _ = Checked(FedAvg(), REFERENCE).aggregate_train(1, replies)
    proximal, _ = Checked(FedProx(proximal_mu=0.0), REFERENCE).aggregate_train(1, replies)
    for key, expected in by_hand.items():
        np.testing.assert_allclose(averaged[key].numpy(), expected, rtol=1e-6)
        np.testing.assert_array_equal(proximal[key].numpy(), averaged[key].numpy())


@pytest.mark.parametrize("corrupt, named", [
    (lambda u: {**u, "layers.0.w": np.full((2, 3), np.nan, np.float32)}, "NaN"),
    (lambda u: {**u, "layers.0.w": np.zeros((3, 2), np.float32)}, "shape"),
    (lambda u: {**u, "layers.9.extra": np.zeros(1, np.float32)}, "unexpected tensors ['layers.9.extra']"),
    (lambda u: {k: v.astype(np.float64) for k, v in u.items()}, "float64"),
    (lambda u: {"layers.0.w": u["layers.0.w"]}, "missing tensors ['layers.5.b']"),
])
def test_a_bad_update_is_dropped_named_and_the_round_goes_on(corrupt, named, caplog):
    good = [update(1), update(2)]
    checked = Checked(FedAvg(), REFERENCE)
    with caplog.at_level("WARNING", logger="offsite"):
        averaged, _ = checked.aggregate_train(3, [reply(21, good[0], 2), reply(22, corrupt(update(3)), 50),
                                                  reply(23, good[1], 2)])
    np.testing.assert_allclose(averaged["layers.5.b"].numpy(), (good[0]["layers.5.b"] + good[1]["layers.5.b"]) / 2,
                               rtol=1e-6)
    assert checked.pending["clients"] == 2 and [d["node"] for d in checked.pending["dropped"]] == [22]
    assert named in checked.pending["dropped"][0]["reason"]
    assert "round 3: dropped the update of node 22" in caplog.text and named in caplog.text


def test_each_strategy_flag_builds_flowers_strategy():
    def strategy(**settings):
        return build_strategy(FederateConfig(bundle="b", output="o", client_data=["a", "b", "c"], **settings))
    assert type(strategy()) is FedAvg and strategy().min_train_nodes == 3 and strategy().fraction_evaluate == 0
    assert strategy(strategy="fedprox", train=TrainConfig(proximal_mu=0.3)).proximal_mu == 0.3
    assert type(strategy(strategy="fedadam", server_lr=0.02)) is FedAdam
    assert strategy(strategy="fedyogi", server_lr=0.02).eta == 0.02
    private = strategy(dp_noise=0.5, dp_clip=2.0)
    assert isinstance(private, DifferentialPrivacyServerSideFixedClipping) and private.clipping_norm == 2.0
    assert private.noise_multiplier == 0.5 and type(private.strategy) is FedAvg
    assert private.accountant.config.population_size == 3 and private.accountant.config.target_delta == 1e-5
    assert strategy(strategy="fedadam", dp_noise=0.5, dp_clip=2.0).accountant is None  # Flower cannot account it


def test_uniform_averaging_gives_every_owner_the_same_weight():
    updates = [update(s) for s in range(3)]
    replies = [reply(node, u, n) for node, (u, n) in enumerate(zip(updates, [5, 1, 14]), start=11)]
    checked = Checked(FedAvg(), REFERENCE, uniform=True)
    averaged, _ = checked.aggregate_train(1, replies)
    for key in REFERENCE.shapes:
        np.testing.assert_allclose(averaged[key].numpy(), sum(u[key] for u in updates) / 3, rtol=1e-5)
    assert checked.pending["examples"] == 20  # the log keeps the owners' real counts


def test_differential_privacy_reports_the_epsilon_spent_every_round(federation):
    bundle, owners, _, root = federation
    words = SAMPLE_TEXT.split()
    small = root / "small-owner.txt"  # owners of different sizes: DP averages them with equal weights
    small.write_text(" ".join(words[: len(words) // 3]))
    out = federate(FederateConfig(bundle=str(bundle), output=str(root / "private"), client_data=[*owners[:2], str(small)],
                                  rounds=2, local_steps=1, train=TRAIN, runtime=CPU, dp_noise=2.0, dp_clip=1.0,
                                  dp_delta=1e-4))
    rounds = [json.loads(line) for line in (out / ROUNDS).read_text().splitlines()]
    spent = [r["dp_epsilon"] for r in rounds[1:]]
    assert rounds[1]["dp_delta"] == 1e-4 and 0 < spent[0] < spent[1]  # it composes round after round
    assert load_adapter(out).training["summary"]["dp_epsilon"] == spent[1]
    # Gaussian mechanism, sensitivity 1 per noise unit: one round of noise 2 at delta 1e-4 is well under 10
    assert spent[0] < 10


def test_a_round_where_every_update_is_bad_changes_nothing():
    checked = Checked(FedAvg(), REFERENCE)
    averaged, _ = checked.aggregate_train(1, [reply(5, {"layers.0.w": np.zeros((2, 3), np.float32)}, 3)])
    assert averaged is None and checked.pending["clients"] == 0


def test_the_proximal_term_keeps_local_training_near_where_it_started(model_dirs, sample_text_file, tmp_path):
    bundle = make_bundle(model_dirs["llama"], tmp_path / "bundle")
    start, _ = bundle_adapter(str(bundle))
    distances = {}
    for mu in (0.0, 50.0):
        out = tune(TuneConfig(bundle=str(bundle), data=str(sample_text_file), output=str(tmp_path / f"mu{mu}"),
                              train=TrainConfig(max_steps=6, lr=3e-2, batch_size=2, seq_len=32, proximal_mu=mu)))
        trained = load_adapter(out).tensors
        distances[mu] = sum(float((t - start[f"layers.{i}.{n}"]).pow(2).sum())
                            for i, named in trained.items() for n, t in named.items())
    assert 0 < distances[50.0] < 0.5 * distances[0.0]


@pytest.fixture(scope="module")
def federation(model_dirs, tmp_path_factory):
    """A tiny bundle, three owners' data (each a different part of one text) and the full model."""
    root = tmp_path_factory.mktemp("federation")
    words = SAMPLE_TEXT.split()
    owners = []
    for i in range(3):
        path = root / f"owner{i}.txt"
        path.write_text(" ".join(words[i * 25:] + words[: i * 25]))
        owners.append(str(path))
    return make_bundle(model_dirs["llama"], root / "bundle"), owners, model_dirs["llama"], root


def run(federation, name, **settings):
    bundle, owners, model, root = federation
    settings = {"rounds": 2, "local_steps": 2, "eval_data": owners[0], "model": str(model), "train": TRAIN,
                "runtime": CPU, **settings}
    config = FederateConfig(bundle=str(bundle), output=str(root / name), client_data=owners, **settings)
    return federate(config)


@pytest.fixture(scope="module")
def plain(federation):
    return run(federation, "plain")


def test_a_simulated_federation_trains_an_adapter_that_plugs(federation, plain, tmp_path):
    bundle, _, model, _ = federation
    start, _ = bundle_adapter(str(bundle))
    adapter = load_adapter(plain)
    trained = {f"layers.{i}.{n}": t for i, named in adapter.tensors.items() for n, t in named.items()}
    assert set(trained) == set(start) and any(not torch.equal(trained[k], start[k]) for k in start)
    summary = adapter.training["summary"]
    assert summary["rounds_applied"] == 2 and summary["clients"] == 3
    assert "client_data" not in adapter.training["federation"]  # the owners' paths are not in the model owner's file
    rounds = [json.loads(line) for line in (plain / ROUNDS).read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients"] == 3 and r["examples"] > 0 and not r["dropped"] for r in rounds[1:])
    assert rounds[2]["eval"]["scored"] == "plug-in" and rounds[2]["eval"]["perplexity"] < rounds[0]["eval"]["perplexity"]
    plug(PlugConfig(model=str(model), adapter=str(plain), output=str(tmp_path / "plugged")))  # plugs unchanged


def test_secure_aggregation_gives_the_same_adapter(federation):
    # One round: in a second, Adam's steps on weights whose gradient is near its eps amplify any
    # difference in where the round starts, rounding included.
    plain, secured = run(federation, "plain-1", rounds=1), run(federation, "secagg", rounds=1, secagg=True)
    plain_tensors, secured_tensors = load_adapter(plain).tensors, load_adapter(secured).tensors
    for index, named in plain_tensors.items():
        for name, tensor in named.items():
            # SecAgg+ rounds each owner's weighted update to 2**29 levels over [-1, 1]
            torch.testing.assert_close(secured_tensors[index][name], tensor, atol=2e-5, rtol=0)
    assert sum(not torch.equal(secured_tensors[i][n], t) for i, named in plain_tensors.items()
               for n, t in named.items()) > 0  # it went through the masking, not around it


def test_a_bad_owner_is_dropped_in_a_real_run_and_the_others_train_on(federation):
    def poison(message, context, call_next):  # the second owner fails, the third sends NaN
        if int(context.node_config["partition-id"]) == 1:
            raise RuntimeError("the owner's disk is full")
        answer = call_next(message, context)
        if int(context.node_config["partition-id"]) == 2 and message.metadata.message_type == MessageType.TRAIN:
            tensors = from_record(answer.content[ARRAYS])
            answer.content[ARRAYS] = to_record({k: torch.full_like(v, float("nan")) for k, v in tensors.items()})
        return answer

    bundle, owners, model, root = federation
    config = FederateConfig(bundle=str(bundle), output=str(root / "poisoned"), client_data=owners, rounds=1,
                            local_steps=1, train=TRAIN, runtime=CPU)
    out = federate(config, client_mods=(poison,))
    line = json.loads((out / ROUNDS).read_text().splitlines()[-1])
    assert line["clients"] == 1 and len(line["dropped"]) == 1 and "NaN" in line["dropped"][0]["reason"]
    assert len(line["failed"]) == 1 and "disk is full" in line["failed"][0]["reason"]
    assert all(torch.isfinite(t).all() for named in load_adapter(out).tensors.values() for t in named.values())


def test_per_round_alignment_sends_the_realigned_emulator_and_the_owners_train_through_it(federation, plain):
    bundle, owners, model, root = federation
    seen = root / "seen"
    seen.mkdir()

    def watch(message, context, call_next):  # what the owners receive, by round (they run in other processes)
        if message.metadata.message_type == MessageType.TRAIN:
            records = message.content.array_records
            emulator = from_record(records[EMULATOR]) if EMULATOR in records else None
            torch.save(emulator, seen / f"round{message.content['config']['server-round']}.pt")
        return call_next(message, context)

    config = FederateConfig(bundle=str(bundle), output=str(root / "aligned"), client_data=owners, rounds=2,
                            local_steps=2, eval_data=owners[0], model=str(model), train=TRAIN, runtime=CPU,
                            alignment=DistillConfig(corpus=owners[1], steps=2, batch_size=2, seq_len=32, lr=1e-2))
    out = federate(config, client_mods=(watch,))
    student, _, manifest = open_bundle(str(bundle))
    shipped = flat(extract(student, emulator_positions(manifest)))
    received = {n: torch.load(seen / f"round{n}.pt") for n in (1, 2)}
    assert received[1] is None  # round 1 trains through the bundle as issued
    assert set(received[2]) == set(shipped) and any(not torch.equal(received[2][k], shipped[k]) for k in shipped)
    rounds = [json.loads(line) for line in (out / ROUNDS).read_text().splitlines()]
    assert rounds[1]["alignment"]["steps"] == 2 and "alignment" not in rounds[2]  # none after the last round
    assert load_adapter(out).training["summary"]["alignments"] == 1
    aligned_tensors, plain_tensors = load_adapter(out).tensors, load_adapter(plain).tensors
    assert any(not torch.equal(aligned_tensors[i][n], t) for i, named in plain_tensors.items()
               for n, t in named.items())  # round 2 trained through the re-aligned emulator


def test_tune_through_given_emulator_weights_checks_them(federation, tmp_path):
    bundle, owners, _, _ = federation
    student, _, manifest = open_bundle(str(bundle))
    emulator = extract(student, emulator_positions(manifest))
    settings = {"bundle": str(bundle), "data": owners[0], "train": TrainConfig(max_steps=2, batch_size=2, seq_len=32)}
    same = load_adapter(tune(TuneConfig(output=str(tmp_path / "same"), **settings), emulator=emulator)).tensors
    own = load_adapter(tune(TuneConfig(output=str(tmp_path / "own"), **settings))).tensors
    for index, named in own.items():
        for name, tensor in named.items():
            torch.testing.assert_close(same[index][name], tensor)  # the bundle's own weights change nothing
    first = min(emulator)
    wrong = {**emulator, first: {name: t[..., :1] for name, t in emulator[first].items()}}
    with pytest.raises(OffsiteError, match="re-aligned emulator"):
        tune(TuneConfig(output=str(tmp_path / "wrong"), **settings), emulator=wrong)


def test_settings_the_federation_refuses(federation, tmp_path):
    bundle, owners, _, _ = federation
    with pytest.raises(ConfigError, match="--dp-noise and --dp-clip go together"):
        FederateConfig(bundle=str(bundle), output="x", client_data=owners, dp_noise=1.0)
    with pytest.raises(ConfigError, match="secure aggregation hides"):
        FederateConfig(bundle=str(bundle), output="x", client_data=owners, dp_noise=1.0, dp_clip=1.0, secagg=True)
    with pytest.raises(ConfigError, match="give --model too"):
        FederateConfig(bundle=str(bundle), output="x", client_data=owners, alignment=DistillConfig(corpus="austen"))
    with pytest.raises(ConfigError, match="--distill with --secagg"):
        FederateConfig(bundle=str(bundle), output="x", client_data=owners, model="m", secagg=True,
                       alignment=DistillConfig(corpus="austen"))
    with pytest.raises(ConfigError, match="--strategy fedprox"):
        FederateConfig(bundle=str(bundle), output="x", client_data=owners, train=TrainConfig(proximal_mu=0.1))
    with pytest.raises(OffsiteError, match="two or more data owners"):
        federate(FederateConfig(bundle=str(bundle), output=str(tmp_path / "o"), client_data=owners[:1]))
    with pytest.raises(OffsiteError, match="--client-data"):
        federate(FederateConfig(bundle=str(bundle), output=str(tmp_path / "o"),
                                client_data=[owners[0], str(tmp_path / "missing.txt")]))


def test_the_cli_documents_every_flag_and_fails_in_one_line(federation, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["federate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--client-data", "--rounds", "--local-steps", "--strategy", "--secagg", "--dp-noise", "--dp-clip", "--dp-delta",
                 "--eval-data", "--model", "--proximal-mu", "--server-lr", "--write-app", "--min-clients", "--distill",
                 "--distill-steps"):
        assert flag in text
    bundle, owners, _, _ = federation
    assert main(["federate", str(bundle), "-o", str(tmp_path / "o"), "--client-data", owners[0]]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two or more data owners" in err


def test_the_app_project_carries_the_settings_but_no_owner_paths(federation, tmp_path):
    bundle, _, model, _ = federation
    config = FederateConfig(bundle=str(bundle), output=str(tmp_path / "adapter"), min_clients=2, rounds=4,
                            strategy="fedprox", train=TrainConfig(lr=3e-4, lora_rank=4, proximal_mu=0.1),
                            eval_data=str(bundle / "offsite.json"), model=str(model),
                            alignment=DistillConfig(corpus="austen", steps=5))
    project = write_app(config, tmp_path / "app")
    settings = tomli.loads(project.read_text())["tool"]["flwr"]["app"]["config"]
    flattened = {**{k: v for k, v in settings.items() if not isinstance(v, dict)},
                 **{f"{k}.{n}": v for k, sub in settings.items() if isinstance(sub, dict) for n, v in sub.items()}}
    again = config_from_run(flattened)  # as the ServerApp reads it back from Flower's run config
    assert again.train == config.train and again.rounds == 4 and again.strategy == "fedprox"
    assert again.alignment == config.alignment
    assert os.path.isabs(again.bundle) and "client_data" not in settings
    assert run_config(config)["train"]["lora_rank"] == 4
    with pytest.raises(OffsiteError, match="--min-clients"):
        write_app(FederateConfig(bundle=str(bundle), output="x"), tmp_path / "app2")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_deployment_runtime_runs_the_same_app(federation, tmp_path):
    """A SuperLink and two SuperNodes on localhost, `flwr run` of the app `--write-app` wrote, then torn down."""
    bundle, owners, model, _ = federation
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FLWR_HOME": str(tmp_path / "flwr"),
           "FLWR_TELEMETRY_ENABLED": "0"}
    link = _free_port()
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "here"\n\n[superlink.here]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    assert main(["federate", str(bundle), "-o", str(tmp_path / "adapter"), "--min-clients", "2", "--rounds", "1",
                 "--local-steps", "1", "--lr", "1e-2", "--batch-size", "2", "--seq-len", "32", "--device", "cpu",
                 "--write-app", str(tmp_path / "app")]) == 0
    processes = [subprocess.Popen([f"{bin_dir}/flower-superlink", "--insecure", "--port", str(link),
                                   "--disable-runtime-dependency-installation"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        for owner in owners[:2]:
            node_config = f'bundle="{bundle}" data-file="{owner}" device="cpu"'
            processes.append(subprocess.Popen(
                [f"{bin_dir}/flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                 "--port", str(_free_port()), "--node-config", node_config], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        for _ in range(60):  # the SuperLink takes a few seconds to listen
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", link)) == 0:
                    break
            time.sleep(0.5)
        result = subprocess.run([f"{bin_dir}/flwr", "run", str(tmp_path / "app"), "here", "--stream"], env=env,
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        adapter = load_adapter(tmp_path / "adapter")
        assert adapter.training["summary"]["rounds_applied"] == 1 and adapter.training["summary"]["clients"] == 2
    finally:
        for process in processes:
            os.killpg(process.pid, 15)
        for process in processes:
            process.wait(timeout=30)
    assert math.isfinite(json.loads((tmp_path / "adapter" / ROUNDS).read_text().splitlines()[-1])["train_loss"])


def test_a_federation_where_no_owner_succeeds_says_so_and_writes_nothing(federation):
    def fail(message, context, call_next):
        raise RuntimeError("no owner can train")

    bundle, owners, _, root = federation
    config = FederateConfig(bundle=str(bundle), output=str(root / "nothing"), client_data=owners[:2], rounds=1,
                            local_steps=1, train=TRAIN, runtime=CPU)
    with pytest.raises(OffsiteError, match="no round of the federation produced an update"):
        federate(config, client_mods=(fail,))
    assert not (root / "nothing").exists()
