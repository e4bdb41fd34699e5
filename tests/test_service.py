"""The model owner's service: routing many adapters through one full model, customers, uploads, downloads."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import SAMPLE_TEXT, make_tiny_model, save_tiny_model

from offsite.arch import get_layers
from offsite.cli import main
from offsite.config import ServeConfig
from offsite.data.types import ChoiceExample
from offsite.errors import OffsiteError
from offsite.exchange.adapter import Adapter, extract, load_adapter
from offsite.loading import load_model, load_tokenizer
from offsite.scoring import choice_logliks
from offsite.service.routing import MultiAdapterModel
from offsite.service.state import ServiceState

fastapi_testclient = pytest.importorskip("fastapi.testclient")

from offsite.service.server import Service, create_app  # noqa: E402 - after the skip


def perturbed(full, layers, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = {i: {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in named.items()}
               for i, named in extract(full, {i: i for i in layers}).items()}
    return Adapter(tensors=tensors, fingerprint="0" * 64, base_model={})


def plugged(full, adapter):
    model = copy.deepcopy(full)
    for index, named in adapter.tensors.items():
        get_layers(model)[index].load_state_dict(named)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "bloom"])
def test_a_mixed_batch_gives_every_row_its_own_plugged_models_logits(family):
    """Rows of two adapters and of none, padded to one width, in one forward pass (bloom: one adapter at a time)."""
    full = make_tiny_model(family, num_layers=6).eval()
    adapters = {"a": perturbed(full, [0, 1, 5], 1), "b": perturbed(full, [0, 1, 5], 2)}
    models = {name: plugged(full, a) for name, a in adapters.items()} | {None: full}
    multi = MultiAdapterModel(copy.deepcopy(full))
    for name, adapter in adapters.items():
        multi.add(name, adapter)
    ids = torch.randint(4, 400, (5, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[3, 7:] = 0
    routes = ["a", None, "b", "a", "b"]
    found = multi.logits(ids, mask, routes)
    for row, route in enumerate(routes):
        n = int(mask[row].sum())
        with torch.no_grad():
            expected = models[route](input_ids=ids[row: row + 1, :n]).logits[0]
        assert torch.allclose(found[row, :n], expected, atol=1e-5), (family, row)
    assert multi.mixes == (family != "bloom")  # bloom's ALiBi rows are laid out by head: checked, then not mixed


def test_an_adapter_that_does_not_fit_the_blocks_is_refused():
    full = make_tiny_model("llama", num_layers=4).eval()
    wrong = perturbed(full, [0], 1)
    wrong.tensors[0]["extra.weight"] = torch.zeros(2)
    with pytest.raises(OffsiteError, match="unexpected keys \\['extra.weight'\\]"):
        MultiAdapterModel(full).add("x", wrong)


def test_tokens_are_stored_hashed_and_survive_a_restart(tmp_path):
    state = ServiceState(tmp_path / "state")
    token = state.add_customer("acme")
    assert state.customer_of(token) == "acme"
    assert state.customer_of(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert state.customer_of("ofs_0000_x") is None and state.customer_of(None) is None
    assert token.split("_")[-1].encode() not in (tmp_path / "state" / "state.sqlite").read_bytes()
    with pytest.raises(OffsiteError, match="a customer of that name exists"):
        state.add_customer("acme")
    state.close()
    assert ServiceState(tmp_path / "state").customer_of(token) == "acme"


def test_secrets_are_compared_in_constant_time_also_for_an_unknown_key(tmp_path, monkeypatch):
    import hmac  # noqa: PLC0415 - this test only

    state = ServiceState(tmp_path / "state")
    token = state.add_customer("acme")
    calls, compare = [], hmac.compare_digest
    monkeypatch.setattr("offsite.service.state.hmac.compare_digest",
                        lambda a, b: calls.append((len(a), len(b))) or compare(a, b))
    assert state.customer_of(token) == "acme" and state.customer_of(token + "x") is None
    assert state.customer_of("ofs_0123456789abcdef_" + token.split("_")[-1]) is None  # no such key id
    assert calls == [(32, 32)] * 3


# --- the HTTP service on a tiny model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def owner(tmp_path_factory, model_dirs):
    """A tiny full model, a folder with one bundle of it, and an adapter trained on that bundle."""
    root = tmp_path_factory.mktemp("service")
    model = str(model_dirs["llama"])
    (root / "train.txt").write_text(SAMPLE_TEXT)
    assert main(["emulate", model, "-o", str(root / "bundles" / "b2"), "--emulator-layers", "2"]) == 0
    assert main(["tune", str(root / "bundles" / "b2"), "--data", str(root / "train.txt"), "-o", str(root / "adapter"),
                 "--max-steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2"]) == 0
    other = save_tiny_model("llama", root / "other-model", num_layers=8, seed=1)
    assert main(["emulate", str(other), "-o", str(root / "other-bundle"), "--emulator-layers", "2"]) == 0
    assert main(["tune", str(root / "other-bundle"), "--data", str(root / "train.txt"), "-o",
                 str(root / "other-adapter"), "--max-steps", "1", "--seq-len", "32", "--batch-size", "2"]) == 0
    return root, model


@pytest.fixture
def service(owner, tmp_path):
    root, model = owner
    config = ServeConfig(model=model, bundles=str(root / "bundles"), state=str(tmp_path / "state"), max_upload_mb=5)
    running = Service(config)
    tokens = {name: running.state.add_customer(name) for name in ("acme", "globex")}
    client = fastapi_testclient.TestClient(create_app(running))
    yield running, client, tokens
    running.close()


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def upload(client, token, folder, bundle="b2", weights=None, metadata=None, names=("adapter.safetensors", "adapter.json")):
    weights = weights if weights is not None else (folder / "adapter.safetensors").read_bytes()
    metadata = metadata if metadata is not None else (folder / "adapter.json").read_bytes()
    return client.post(f"/adapters?bundle={bundle}", headers=auth(token),
                       files={"weights": (names[0], weights), "metadata": (names[1], metadata)})


def test_no_token_or_a_wrong_one_gets_401_and_nothing_else(service):
    _, client, tokens = service
    for headers in ({}, auth("ofs_1234_nope"), auth(tokens["acme"] + "x"), {"Authorization": tokens["acme"]}):
        response = client.get("/bundles", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert "b2" not in response.text


def test_an_uploaded_adapter_is_served_to_its_customer_only(service, owner):
    running, client, tokens = service
    root, model = owner
    response = upload(client, tokens["acme"], root / "adapter")
    assert response.status_code == 201, response.text
    adapter_id = response.json()["id"]
    assert [a["id"] for a in client.get("/adapters", headers=auth(tokens["acme"])).json()] == [adapter_id]
    assert client.get("/adapters", headers=auth(tokens["globex"])).json() == []
    body = {"adapter": adapter_id, "prompt": "The old lighthouse stood at the", "continuations": [" edge", " sea"]}
    mine = client.post("/v1/score", json=body, headers=auth(tokens["acme"]))
    theirs = client.post("/v1/score", json=body, headers=auth(tokens["globex"]))
    unknown = client.post("/v1/score", json={**body, "adapter": "0" * 32}, headers=auth(tokens["globex"]))
    assert mine.status_code == 200 and theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"]["message"].replace(adapter_id, "X") == unknown.json()["error"]["message"].replace(
        "0" * 32, "X")  # another's adapter reads as an unknown one
    full = load_model(model).eval()  # the customer's plugged model, scored as `offsite eval` scores a choice
    from offsite.exchange.adapter import plug_into  # noqa: PLC0415 - beside the model it needs
    plug_into(full, load_adapter(root / "adapter"), root / "adapter", (0, 1, 6, 7))
    expected = choice_logliks(full, load_tokenizer(model), ChoiceExample(body["prompt"], (" edge", " sea"), 0), 1024)
    assert [s["logprob"] for s in mine.json()["scores"]] == pytest.approx(expected, abs=1e-4)
    completion = client.post("/v1/completions", json={"model": adapter_id, "prompt": "The old", "max_tokens": 5},
                             headers=auth(tokens["acme"])).json()
    ids = load_tokenizer(model)("The old", return_tensors="pt")["input_ids"]
    greedy = full.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected_text = load_tokenizer(model).decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
    assert completion["choices"][0]["text"] == expected_text and completion["usage"]["completion_tokens"] >= 1
    actions = [e["action"] for e in running.state.audit_log("acme")]
    assert "adapter uploaded" in actions and "score" in actions and "completion" in actions


def _cut(folder, **change):
    """adapter.json (bytes) of `folder` with fields changed."""
    meta = json.loads((folder / "adapter.json").read_text())
    meta.update(change)
    return json.dumps(meta).encode()


def _nan_adapter(folder):
    """The adapter with one weight NaN and adapter.json's SHA-256 made to match (a consistent but poisoned file)."""
    tensors = load_file(str(folder / "adapter.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    path = folder.parent / "nan.safetensors"
    save_file(tensors, str(path), metadata={"format": "offsite-adapter"})
    weights = path.read_bytes()
    return weights, _cut(folder, weights_sha256=hashlib.sha256(weights).hexdigest())


def _archive(folder, kind):
    path = shutil.make_archive(str(folder.parent / f"adapter-{kind}"), kind, folder)
    weights = open(path, "rb").read()
    return weights, _cut(folder, weights_sha256=hashlib.sha256(weights).hexdigest())


def _tampered_header(folder):
    weights = bytearray((folder / "adapter.safetensors").read_bytes())
    size = struct.unpack("<Q", weights[:8])[0]
    header = weights[8: 8 + size].replace(b'"F32"', b'"F16"', 1)
    return bytes(weights[:8] + header + weights[8 + size:]), None


@pytest.mark.parametrize("case, status, message", [
    ("over the limit", 413, "limit of 5000000 bytes"),
    ("truncated", 400, "modified or damaged"),
    ("tampered header", 400, "modified or damaged"),
    ("NaN weights", 400, "holds NaN or infinite values"),
    ("wrong base", 400, "another base model"),
    ("path in a file name", 400, "is a path"),
    ("zip instead of safetensors", 400, "cannot read"),
    ("tar instead of safetensors", 400, "cannot read"),
    ("missing part", 400, "incomplete"),
    ("unknown bundle", 404, "no bundle"),
])
def test_bad_uploads_are_refused_and_leave_nothing_behind(service, owner, case, status, message):
    running, client, tokens = service
    root, _ = owner
    folder = root / "adapter"
    weights = (folder / "adapter.safetensors").read_bytes()
    if case == "over the limit":
        response = upload(client, tokens["acme"], folder, weights=b"\0" * 5_000_001)
    elif case == "truncated":
        response = upload(client, tokens["acme"], folder, weights=weights[: len(weights) // 2])
    elif case == "tampered header":
        response = upload(client, tokens["acme"], folder, weights=_tampered_header(folder)[0])
    elif case == "NaN weights":
        weights, metadata = _nan_adapter(folder)
        response = upload(client, tokens["acme"], folder, weights=weights, metadata=metadata)
    elif case == "wrong base":
        response = upload(client, tokens["acme"], root / "other-adapter")
    elif case == "path in a file name":
        response = upload(client, tokens["acme"], folder, names=("../../adapter.safetensors", "adapter.json"))
    elif case.endswith("instead of safetensors"):
        weights, metadata = _archive(folder, case.split()[0])
        response = upload(client, tokens["acme"], folder, weights=weights, metadata=metadata)
    elif case == "missing part":
        response = client.post("/adapters?bundle=b2", headers=auth(tokens["acme"]),
                               files={"weights": ("adapter.safetensors", weights)})
    else:
        response = upload(client, tokens["acme"], folder, bundle="nope")
    assert response.status_code == status and message in response.json()["error"]["message"], response.text
    state = running.state.root
    assert running.state.adapters_of("acme") == [] and not list((state / "adapters").iterdir())
    assert not list((state / "incoming").iterdir())
    assert sorted(p.name for p in state.iterdir()) == ["adapters", "incoming", "state.sqlite", "state.sqlite-shm",
                                                       "state.sqlite-wal"]


def test_a_bundle_file_downloads_whole_or_by_range_with_its_sha256(service, owner):
    _, client, tokens = service
    root, _ = owner
    listing = client.get("/bundles/b2", headers=auth(tokens["acme"])).json()
    entry = next(f for f in listing["files"] if f["name"].endswith(".safetensors"))
    data = (root / "bundles" / "b2" / entry["name"]).read_bytes()
    whole = client.get(f"/bundles/b2/files/{entry['name']}", headers=auth(tokens["acme"]))
    assert whole.content == data and whole.headers["x-content-sha256"] == entry["sha256"] == hashlib.sha256(data).hexdigest()
    part = client.get(f"/bundles/b2/files/{entry['name']}", headers={**auth(tokens["acme"]), "Range": "bytes=100-"})
    assert part.status_code == 206 and part.content == data[100:]
    assert client.get("/bundles/b2/files/..%2Foffsite.json", headers=auth(tokens["acme"])).status_code == 404
    assert client.get("/bundles/b2/files/config.py", headers=auth(tokens["acme"])).status_code == 404


def test_a_restart_keeps_customers_and_adapters(service, owner):
    running, client, tokens = service
    root, _ = owner
    adapter_id = upload(client, tokens["acme"], root / "adapter").json()["id"]
    running.close()
    again = Service(running.config)
    try:
        client = fastapi_testclient.TestClient(create_app(again))
        body = {"adapter": adapter_id, "prompt": "The old", "continuations": [" lighthouse"]}
        assert client.post("/v1/score", json=body, headers=auth(tokens["acme"])).status_code == 200
        assert not list((again.state.root / "incoming").iterdir())  # loading the adapters left nothing there
    finally:
        again.close()


# --- a real server process: the command line on both sides, and kill -9 ------------------------------------

def _free_port():
    import socket  # noqa: PLC0415 - these process tests only

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(owner_root, model, state, port):
    import subprocess  # noqa: PLC0415 - these process tests only

    from offsite.service.client import start_server  # noqa: PLC0415 - beside the import above

    return start_server(["--model", model, "--bundles", str(owner_root / "bundles"), "--state", str(state)], port,
                        seconds=120, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill(process):
    import signal  # noqa: PLC0415 - these process tests only

    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_the_command_line_round_trip_and_a_kill_9_during_and_after_an_upload(owner, tmp_path, capsys, monkeypatch):
    import threading  # noqa: PLC0415 - this test only

    import httpx  # noqa: PLC0415 - beside the import above

    root, model = owner
    state, port = tmp_path / "state", _free_port()
    assert main(["serve", "--state", str(state), "--add-customer", "acme"]) == 0
    token = capsys.readouterr().out.strip().split()[-1]
    monkeypatch.setenv("OFFSITE_TOKEN", token)
    url = f"http://127.0.0.1:{port}"
    server = _start(root, model, state, port)
    try:
        assert main(["remote", "--url", url, "download", "b2", "-o", str(tmp_path / "mine")]) == 0
        assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == sorted(p.name for p in (root / "bundles" / "b2").iterdir())
        # an upload cut off by kill -9: half the body sent, then the server dies
        weights = (root / "adapter" / "adapter.safetensors").read_bytes()
        sent = threading.Event()

        def slow_body():
            yield b"--b\r\nContent-Disposition: form-data; name=\"weights\"; filename=\"adapter.safetensors\"\r\n\r\n"
            yield weights[: len(weights) // 2]
            sent.set()
            threading.Event().wait(30)  # never finishes: the server is killed meanwhile

        def post():
            try:
                httpx.post(f"{url}/adapters?bundle=b2", content=slow_body(), timeout=60,
                           headers={"Authorization": f"Bearer {token}",
                                    "Content-Type": "multipart/form-data; boundary=b"})
            except httpx.HTTPError:
                pass

        threading.Thread(target=post, daemon=True).start()
        assert sent.wait(30)
        threading.Event().wait(1)  # the server has written part of it into its incoming folder
        assert any((state / "incoming").rglob("adapter.safetensors"))
        _kill(server)
        server = _start(root, model, state, port)
        assert not list((state / "incoming").iterdir()) and not list((state / "adapters").iterdir())
        assert main(["remote", "--url", url, "upload", str(root / "adapter"), "--bundle", "b2"]) == 0
        adapter_id = capsys.readouterr().out.split("id ")[1].split()[0]
        _kill(server)  # right after the upload was answered: it must have been registered for good
        server = _start(root, model, state, port)
        assert main(["remote", "--url", url, "complete", adapter_id, "The old", "--max-tokens", "3"]) == 0
        assert main(["remote", "--url", url, "adapters"]) == 0
        assert adapter_id in capsys.readouterr().out
        assert main(["remote", "--url", url, "--token", "ofs_0_x", "bundles"]) == 1
        assert "answered 401" in capsys.readouterr().err
    finally:
        _kill(server)


def test_listening_beyond_this_machine_needs_public_and_warns_without_tls(monkeypatch, caplog, tmp_path, capsys):
    import offsite.service.run as run  # noqa: PLC0415 - this test only

    code = main(["serve", "--state", str(tmp_path), "--model", "m", "--bundles", "b", "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert code == 1 and "--host 0.0.0.0 lets other machines reach the service; add --public" in err
    assert "required to serve" in (main(["serve", "--state", str(tmp_path)]), capsys.readouterr().err)[1]
    started = []
    monkeypatch.setattr(run, "Service", lambda config: type("S", (), {"close": lambda self: None})())
    monkeypatch.setattr(run, "create_app", lambda service: "app")
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: started.append(kwargs))
    with caplog.at_level("WARNING", logger="offsite"):
        run.serve(ServeConfig(state=str(tmp_path), model="m", bundles="b", host="0.0.0.0", public=True))
    assert started[0]["host"] == "0.0.0.0" and "without TLS" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="offsite"):
        run.serve(ServeConfig(state=str(tmp_path), model="m", bundles="b"))
    assert started[1]["host"] == "127.0.0.1" and "without TLS" not in caplog.text
