"""`offsite bench`: the JSON it prints, what each setting trains, the FLOP formula and clean errors. No timings."""

import json

import pytest
import torch
from tiny_models import make_tiny_model

from offsite import SplitConfig
from offsite.cli import main
from offsite.studies.bench import settings as bench_settings
from offsite.studies.bench.bench import bench
from offsite.studies.bench.settings import SETTINGS, BenchConfig
from offsite.studies.bench.table import format_bench

TINY = dict(split=SplitConfig(bottom=2, top=2, emulator_layers=2), batch_size=2, seq_len=16, steps=2,
            warmup_steps=1, epochs=2, isolate=False, threads=1)
ROW_KEYS = {"setting", "tokens_per_s", "step_seconds", "peak_rss_mb", "peak_tensor_mb", "tensor_mb_before_step",
            "trainable_params", "trained_layers", "model_blocks", "logits", "torch_threads",
            "allocator", "device", "dtype", "device_peak_mb"}


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()  # in-process runs set the bench's thread count
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama_result(model_dirs):
    return bench(BenchConfig(model=str(model_dirs["llama"]), eval_examples=2, **TINY))


def block_counts():
    """Parameters of one block of the tiny llama, and the LoRA (rank 8) parameters on its linear maps."""
    block = make_tiny_model("llama", num_layers=1).model.layers[0]
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    return sum(p.numel() for p in block.parameters()), sum(8 * (m.in_features + m.out_features) for m in linears)


def test_json_has_every_setting_ratio_and_limit(llama_result):
    result = json.loads(json.dumps(llama_result))  # JSON-able as printed by --json
    assert [row["setting"] for row in result["rows"]] == list(SETTINGS)
    for row in result["rows"]:
        assert ROW_KEYS <= set(row), row["setting"]
        assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0 and row["torch_threads"] == 1
        # the step's peak holds at least what lived before it (weights, optimizer state)
        assert row["peak_tensor_mb"] > row["tensor_mb_before_step"] > 0
    for key in ("speedup", "memory_reduction", "tensor_memory_reduction", "flop_ratio_limit"):
        assert set(result[key]) == set(SETTINGS) and result[key]["full_ft"] == 1.0
    assert result["flop_formula"] and result["machine"]["cpu_count"] >= 1
    cached = result["rows"][-1]
    assert cached["epochs"] == 2 and cached["blocks_run_per_step"] == 2 and cached["cache_seconds"] > 0
    assert "offsite_top_cached" in format_bench(llama_result)


def test_each_setting_trains_what_it_claims(llama_result):
    block, lora = block_counts()
    rows = {row["setting"]: row for row in llama_result["rows"]}
    expected = {  # (trainable parameters, original layers that train, blocks in the model it runs)
        "full_ft": (8 * block, list(range(8)), 8),
        "full_ft_lora": (8 * lora, list(range(8)), 8),
        "offsite": (4 * block, [0, 1, 6, 7], 6),
        "offsite_lora": (4 * lora, [0, 1, 6, 7], 6),
        "offsite_top_cached": (2 * block, [6, 7], 4),  # --bottom 0: emulator of 2 blocks + top 2
    }
    for name, (params, layers, blocks) in expected.items():
        assert (rows[name]["trainable_params"], rows[name]["trained_layers"], rows[name]["model_blocks"]) == \
            (params, layers, blocks), name
    assert {rows[n]["logits"] for n in ("full_ft", "full_ft_lora")} == {"all positions"}
    assert {rows[n]["logits"] for n in ("offsite", "offsite_lora", "offsite_top_cached")} == {"scored positions"}


def test_flop_limit_follows_the_documented_formula(llama_result):
    # Tiny llama: hidden 64, 4 heads of 16 (d_attn 64), 2 KV heads, MLP 128, vocab 512, T = 16, one scored token.
    weights = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v, o, gate, up, down
    attention = 64 * (16 + 1)
    head = 512 * 64
    train, passes, forward = 3 * (weights + attention), 2 * weights + 3 * attention, weights + attention
    full = 8 * train + 2 * head
    offsite = 4 * train + 2 * passes + 2 * head / 16  # emulator keeps layers 2 and 5, above adapter layer 0
    cached = 2 * train + 2 * forward / 2 + 2 * head / 16  # 2 epochs: the emulator runs once
    costs = llama_result["flop_cost_per_token"]
    assert (costs["full_ft"], costs["offsite"], costs["offsite_top_cached"]) == (full, offsite, cached)
    assert llama_result["flop_ratio_limit"]["offsite"] == pytest.approx(full / offsite)


def test_variants_undo_one_optimisation_each(model_dirs):
    variants = ["offsite", "offsite_emulator_grads", "offsite_all_logits", "offsite_checkpointed", "offsite_top",
                "offsite_lora", "offsite_lora_checkpointed", "offsite_top_cached_lora"]
    result = bench(BenchConfig(model=str(model_dirs["llama"]), settings=["full_ft", *variants], eval_examples=0,
                               **TINY))
    rows = {row["setting"]: row for row in result["rows"]}
    block, _ = block_counts()
    for name in variants[:4]:  # the same adapter trains; only how the step is computed differs
        assert (rows[name]["trainable_params"], rows[name]["trained_layers"]) == (4 * block, [0, 1, 6, 7]), name
    assert (rows["offsite_top"]["trainable_params"], rows["offsite_top"]["trained_layers"]) == (2 * block, [6, 7])
    assert rows["offsite_all_logits"]["logits"] == "all positions" and rows["offsite"]["logits"] == "scored positions"
    # Gradients of every frozen weight, or logits everywhere, cost tensor memory; the variants must really do that.
    assert rows["offsite_emulator_grads"]["peak_tensor_mb"] > rows["offsite"]["peak_tensor_mb"]
    assert rows["offsite_all_logits"]["peak_tensor_mb"] > rows["offsite"]["peak_tensor_mb"]
    assert rows["offsite_checkpointed"]["peak_tensor_mb"] < rows["offsite"]["peak_tensor_mb"]
    lora, checkpointed = rows["offsite_lora"], rows["offsite_lora_checkpointed"]
    assert checkpointed["trainable_params"] == lora["trainable_params"] < rows["offsite"]["trainable_params"]
    assert checkpointed["trained_layers"] == lora["trained_layers"] == [0, 1, 6, 7]
    assert checkpointed["peak_tensor_mb"] < lora["peak_tensor_mb"]
    # the cached setting parks the emulator's weights while it steps, so it holds less than offsite_top
    assert rows["offsite_top_cached_lora"]["tensor_mb_before_step"] < rows["offsite_top"]["tensor_mb_before_step"]
    cached_lora = rows["offsite_top_cached_lora"]
    assert cached_lora["trained_layers"] == [6, 7] and cached_lora["blocks_run_per_step"] == 2
    assert 0 < cached_lora["trainable_params"] < lora["trainable_params"] / 2 + 1
    assert all(row["allocator"] in ("tcmalloc", "system") for row in rows.values())
    assert all(0 < row["runtime_rss_mb"] < row["peak_rss_mb"] for row in rows.values())
    assert set(result["flop_ratio_limit"]) == {"full_ft", *variants}
    weights = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128  # tiny llama, as below
    attention, head = 64 * (16 + 1), 512 * 64
    train, passes = 3 * (weights + attention), 2 * weights + 3 * attention
    costs = result["flop_cost_per_token"]
    assert costs["offsite_emulator_grads"] == 6 * train + 2 * head / 16
    assert costs["offsite_all_logits"] == 4 * train + 2 * passes + 2 * head
    assert costs["offsite_checkpointed"] == 4 * train + 2 * (3 * weights + 4 * attention) + 2 * head / 16
    recompute = costs["offsite_checkpointed"] - costs["offsite"]
    assert recompute == 2 * (weights + attention)  # one more forward of each emulator block
    assert costs["offsite_lora_checkpointed"] - costs["offsite_lora"] == recompute
    lora_block = (costs["offsite_lora"] - 2 * passes - 2 * head / 16) / 4
    # two LoRA top blocks; the two emulator blocks run forward once over the 2 epochs
    assert costs["offsite_top_cached_lora"] == pytest.approx(2 * lora_block + (weights + attention) + 2 * head / 16)
    assert costs["offsite_top"] == 2 * train + 2 * (weights + attention) + 2 * head / 16
    assert "Above it, the memory ratios are: offsite" in format_bench(result)
    assert f"{rows['offsite']['allocator']} allocator" in format_bench(result)


def test_choice_evaluation_agrees_with_the_naive_loop(llama_result):
    evaluation = llama_result["evaluation"]
    assert evaluation["examples"] == 2 and evaluation["choices"] == 5
    assert evaluation["offsite_examples_per_s"] > 0 and evaluation["naive_examples_per_s"] > 0
    assert evaluation["max_abs_loglik_diff"] < 1e-3  # the shared-context cache scores exactly what the loop does


def test_random_shape_builds_models_from_the_config(monkeypatch):
    monkeypatch.setitem(bench_settings.RANDOM_SHAPES, "tiny-gpt2", {
        "model_type": "gpt2", "n_layer": 6, "n_embd": 64, "n_head": 4, "vocab_size": 512, "n_positions": 64})
    result = bench(BenchConfig(random_shape="tiny-gpt2", settings=["offsite", "offsite_top_cached"],
                               eval_examples=5, **TINY))
    rows = {row["setting"]: row for row in result["rows"]}
    assert result["model"] == "random:tiny-gpt2" and result["evaluation"] is None  # no tokenizer to score text
    assert rows["offsite"]["trained_layers"] == [0, 1, 4, 5] and rows["offsite"]["model_blocks"] == 6
    assert rows["offsite_top_cached"]["trained_layers"] == [4, 5] and rows["offsite_top_cached"]["model_blocks"] == 4
    assert result["speedup"] == {} and result["flop_ratio_limit"]["offsite_top_cached"] > 1  # no full_ft row


def test_cli_prints_one_json_object(model_dirs, capsys):
    code = main(["bench", str(model_dirs["llama"]), "--emulator-layers", "2", "--batch-size", "2", "--seq-len", "16",
                 "--steps", "1", "--warmup-steps", "0", "--settings", "offsite_lora", "--eval-examples", "0",
                 "--threads", "1", "--in-process", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert [row["setting"] for row in result["rows"]] == ["offsite_lora"] and result["evaluation"] is None


@pytest.mark.parametrize("argv, message", [
    (["bench"], "pass either MODEL or --random-shape"),
    (["bench", "--random-shape", "gpt5"], "--random-shape='gpt5' is not known; available: gpt2-large"),
    (["bench", "--random-shape", "gpt2-large", "--method", "uniform+int8"], "--random-shape builds uniform emulators"),
    (["bench", "{model}", "--steps", "0"], "--steps=0 must be greater than 0"),
    (["bench", "{model}", "--settings", "offsite", "fast"], "--settings offsite fast: give each once"),
    (["bench", "{model}", "--task", "qa"], "--task='qa' is not known"),
    (["bench", "{model}", "--emulator-layers", "50"], "--emulator-layers=50 is more than the 4 middle"),
    (["bench", "{model}", "--emulator-layers", "2", "--seq-len", "5000"], "--seq-len=5000 is longer than this model's 1024 positions"),
    (["bench", "{model}", "--top", "0", "--bottom", "2"], "--top 0: offsite_top_cached trains the top adapter"),
])
def test_bad_input_gives_one_line_error(model_dirs, capsys, argv, message):
    code = main([a.format(model=model_dirs["llama"]) for a in argv])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("error") == 1 and message in err and "Traceback" not in err, err



def test_bench_runs_the_settings_in_the_asked_dtype_and_says_where(model_dirs):
    from offsite.config import DeviceConfig
    result = bench(BenchConfig(model=str(model_dirs["llama"]), eval_examples=0, settings=["full_ft", "offsite"],
                               runtime=DeviceConfig(device="cpu", dtype="bfloat16"), **TINY))
    assert {(row["device"], row["dtype"]) for row in result["rows"]} == {("cpu", "bfloat16")}
    assert all(row["device_peak_mb"] is None for row in result["rows"])  # a GPU's own count; none here
    assert result["device_memory_reduction"] == {}
    assert "cpu bfloat16" in format_bench(result)
