"""Distillation of the emulator on tiny models."""

import json

import torch
from conftest import input_batch
from transformers import AutoModelForCausalLM

from offsite import EmulateConfig, SplitConfig, emulate
from offsite.arch import get_layers
from offsite.config import DistillConfig
from offsite.emulator.distill import alignment_targets, distill, kd_loss, read_corpus
from offsite.emulator.split import plan_split
from offsite.emulator.surgery import keep_layers
from offsite.exchange.bundle import read_manifest
from offsite.data.tokens import lm_sequences
from offsite.loading import load_tokenizer


def test_alignment_targets_match_each_kept_layer_with_the_end_of_its_span():
    plan = plan_split(8, SplitConfig(emulator_layers=2))  # emulator keeps 2 and 5 of 2..5
    assert alignment_targets(plan, "final") == [(4, 6)]
    assert alignment_targets(plan, "per-layer") == [(3, 5), (4, 6)]


def pair(model_dirs, family="llama", emulator_layers=2):
    full = AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()
    student = AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()
    plan = plan_split(8, SplitConfig(emulator_layers=emulator_layers))
    keep_layers(student, plan.kept)
    return full, student, plan


def kd_on(full, student, plan, ids, align="final", normalise="global"):
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return float(kd_loss(dict(enumerate(student(input_ids=ids, output_hidden_states=True).hidden_states)),
                             dict(enumerate(full(input_ids=ids, output_hidden_states=True).hidden_states)),
                             alignment_targets(plan, align), mask, normalise))


def test_token_normalisation_weighs_every_token_the_same_and_global_does_not():
    target = torch.ones(1, 3, 4)
    target[0, 0] *= 100.0  # one token with very large activations, as the first token of many models has
    student = target.clone()
    student[0, 1] = 0.0  # an ordinary token entirely wrong
    mask = torch.ones(1, 3)
    token = kd_loss({1: student}, {1: target}, [(1, 1)], mask, "token")
    global_ = kd_loss({1: student}, {1: target}, [(1, 1)], mask, "global")
    assert torch.isclose(token, torch.tensor(1 / 3))  # one token of three entirely wrong
    assert global_ < 1e-3  # drowned by the large token


def test_kd_loss_is_zero_when_nothing_is_dropped(model_dirs):
    full, student, plan = pair(model_dirs, emulator_layers=4)
    assert kd_on(full, student, plan, input_batch(), "per-layer") == 0.0
    full, student, plan = pair(model_dirs, emulator_layers=2)
    assert kd_on(full, student, plan, input_batch()) > 0.01


def run(model_dirs, tmp_path, checkpoint, steps, emulator_layers=2, **settings):
    full, student, plan = pair(model_dirs, emulator_layers=emulator_layers)
    settings = {"corpus": str(tmp_path / "corpus.txt"), "steps": steps, "lr": 1e-3, "batch_size": 2, "seq_len": 32,
                "eval_every": 2, **settings}
    settings = DistillConfig(**settings)
    summary = distill(full, student, load_tokenizer(str(model_dirs["llama"])), plan, settings,
                      read_corpus(settings), checkpoint)
    return full, student, plan, summary


def test_distillation_trains_only_the_emulator_and_lowers_kd(model_dirs, sample_text_file, tmp_path):
    sample_text_file.rename(tmp_path / "corpus.txt")
    full, student, plan, summary = run(model_dirs, tmp_path, tmp_path / "ckpt", steps=6, lm_weight=0.0)
    ids = input_batch(length=32)
    _, untouched, _ = pair(model_dirs)
    assert kd_on(full, student, plan, ids) < kd_on(full, untouched, plan, ids)
    assert kd_on(full, student, plan, ids, normalise="token") < kd_on(full, untouched, plan, ids, normalise="token")
    before, after = get_layers(untouched), get_layers(student)
    for position, original in enumerate(plan.kept):
        same = all(torch.equal(a, b) for a, b in zip(before[position].state_dict().values(),
                                                     after[position].state_dict().values()))
        assert same == (original in plan.adapter)
    assert torch.equal(student.get_input_embeddings().weight, untouched.get_input_embeddings().weight)
    assert summary["steps"] == 6 and summary["final_lm"] == 0.0 and len(summary["corpus_sha256"]) == 64


def test_interrupted_distillation_resumes_to_the_same_weights(model_dirs, sample_text_file, tmp_path):
    sample_text_file.rename(tmp_path / "corpus.txt")
    _, straight, _, _ = run(model_dirs, tmp_path, tmp_path / "a", steps=4)
    run(model_dirs, tmp_path, tmp_path / "b", steps=2)  # "interrupted" after its checkpoint at step 2
    _, resumed, _, summary = run(model_dirs, tmp_path, tmp_path / "b", steps=4)
    assert summary["steps"] == 4
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_checkpoint_of_another_emulator_is_ignored_not_half_loaded(model_dirs, sample_text_file, tmp_path,
                                                                     caplog):
    sample_text_file.rename(tmp_path / "corpus.txt")
    run(model_dirs, tmp_path, tmp_path / "ckpt", steps=2)
    with caplog.at_level("WARNING", logger="offsite"):
        _, student, plan, summary = run(model_dirs, tmp_path, tmp_path / "ckpt", steps=2, emulator_layers=3)
    assert "another emulator" in caplog.text and summary["steps"] == 2 and len(plan.emulator) == 3
    _, untouched, _ = pair(model_dirs, emulator_layers=3)
    assert not torch.equal(get_layers(student)[2].mlp.up_proj.weight, get_layers(untouched)[2].mlp.up_proj.weight)


def test_emulate_with_distill_records_it_and_plugging_still_works(model_dirs, sample_text_file, tmp_path):
    split = SplitConfig(emulator_layers=2)
    plain = emulate(EmulateConfig(model=str(model_dirs["qwen2"]), output=str(tmp_path / "plain"), split=split))
    distilled = emulate(EmulateConfig(
        model=str(model_dirs["qwen2"]), output=str(tmp_path / "distilled"), split=split,
        distill=DistillConfig(corpus=str(sample_text_file), steps=2, batch_size=2, seq_len=32, eval_every=1)))
    manifest = read_manifest(distilled)
    assert manifest.emulator["method"] == "uniform+distill" and manifest.emulator["distill"]["steps"] == 2
    assert manifest.fingerprint == read_manifest(plain).fingerprint  # adapter layers are untouched
    assert json.loads((tmp_path / "plain" / "offsite.json").read_text())["emulator"]["distill"] is None
    assert not (tmp_path / ".distilled.distill").exists()  # the checkpoint is removed once the bundle is written


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_without_the_lm_loss_nothing_above_the_middle_block_runs(model_dirs, sample_text_file, tmp_path):
    sample_text_file.rename(tmp_path / "corpus.txt")
    full, student, plan = pair(model_dirs)
    above = [_count_calls(get_layers(full)[-1]), _count_calls(full.lm_head), _count_calls(get_layers(student)[-1]),
             _count_calls(student.lm_head)]
    middle_end = _count_calls(get_layers(full)[plan.num_layers - len(plan.top) - 1])
    settings = DistillConfig(corpus=str(tmp_path / "corpus.txt"), steps=3, batch_size=2, seq_len=32, lm_weight=0.0,
                             kl_weight=0.0)
    distill(full, student, load_tokenizer(str(model_dirs["llama"])), plan, settings, read_corpus(settings),
            tmp_path / "ckpt")
    assert above == [[], [], [], []] and len(middle_end) == 3
    with_lm = DistillConfig(corpus=str(tmp_path / "corpus.txt"), steps=1, batch_size=2, seq_len=32, lm_weight=1.0,
                            kl_weight=0.0)
    distill(full, student, load_tokenizer(str(model_dirs["llama"])), plan, with_lm, read_corpus(with_lm),
            tmp_path / "ckpt2")
    assert len(above[3]) == 1 and above[1] == []  # the student's head runs for its LM loss; the full model's never


def test_the_full_model_runs_once_per_window_when_its_outputs_are_kept(model_dirs, sample_text_file, tmp_path):
    (tmp_path / "corpus.txt").write_text(sample_text_file.read_text()[:400])
    full, student, plan = pair(model_dirs)
    tokenizer = load_tokenizer(str(model_dirs["llama"]))
    settings = DistillConfig(corpus=str(tmp_path / "corpus.txt"), steps=30, batch_size=2, seq_len=16, lm_weight=0.0,
                             kl_weight=0.0)
    windows = len(lm_sequences(tokenizer, read_corpus(settings).texts, 16))
    assert settings.steps * settings.batch_size > 2 * windows  # the corpus comes back at least twice
    calls = _count_calls(get_layers(full)[0])
    summary = distill(full, student, tokenizer, plan, settings, read_corpus(settings), tmp_path / "ckpt")
    assert summary["teacher_outputs_kept"] and summary["tokens_per_second"] > 0
    assert len(calls) <= -(-windows // settings.batch_size) + 1  # the first pass only (a batch may straddle it)


def test_the_checkpoint_kept_is_the_best_held_out_standin(model_dirs, sample_text_file, tmp_path, monkeypatch):
    from offsite.data.types import TextData
    from offsite.emulator import distill as distillation
    heldout = TextData([sample_text_file.read_text()[::-1]], "held-out")  # other text than the training corpus
    (tmp_path / "heldout.txt").write_text(heldout.texts[0])  # a file corpus has no held-out split: --distill-heldout
    sample_text_file.rename(tmp_path / "corpus.txt")
    scores = []
    monkeypatch.setattr(distillation, "_offer", lambda state, value, *args, original=distillation._offer:
                        (scores.append(value), original(state, value, *args))[1])
    full, student, plan, summary = run(model_dirs, tmp_path, tmp_path / "ckpt", steps=6, lm_weight=0.0, lr=3e-3,
                                       eval_windows=4, heldout=str(tmp_path / "heldout.txt"))
    assert summary["selected_by"] == "standin_error" and len(scores) == 3
    assert [h["standin_error"] for h in summary["heldout"][1:]] == scores  # perplexity beside it, for the other choice
    assert all(h["perplexity"] > 1 for h in summary["heldout"])
    assert summary["heldout_standin_error_best"] == min(scores) and summary["best_step"] == 2 * (1 + scores.index(min(scores)))
    judge = distillation._Judge(full, student, load_tokenizer(str(model_dirs["llama"])), heldout,
                                alignment_targets(plan, "final"), DistillConfig(corpus="x", seq_len=32, eval_windows=4))
    assert abs(judge.scores()["standin_error"] - min(scores)) < 1e-5  # the student now holds the best checkpoint's weights
    _, _, _, by_perplexity = run(model_dirs, tmp_path, tmp_path / "ckpt-ppl", steps=2, select="perplexity",
                                  heldout=str(tmp_path / "heldout.txt"))
    assert by_perplexity["selected_by"] == "perplexity" and by_perplexity["heldout_perplexity_best"] > 1
    assert summary["heldout_sha256"] == heldout.sha256()
    _, _, _, no_heldout = run(model_dirs, tmp_path, tmp_path / "ckpt-none", steps=2)
    assert no_heldout["heldout"] == [] and no_heldout["heldout_sha256"] is None  # a file corpus alone: the last checkpoint


def test_output_kl_is_zero_for_equal_logits_and_trains_the_emulator_towards_the_full_model(
        model_dirs, sample_text_file, tmp_path):
    from offsite.emulator.distill import output_kl
    logits = torch.randn(2, 5, 7)
    mask = torch.ones(2, 5)
    assert float(output_kl(logits, logits, mask)) < 1e-6 and float(output_kl(logits, torch.randn(2, 5, 7), mask)) > 0
    sample_text_file.rename(tmp_path / "corpus.txt")
    full, student, plan, summary = run(model_dirs, tmp_path, tmp_path / "ckpt", steps=6, kd_weight=0.0,
                                       lm_weight=0.0, kl_weight=1.0)
    _, untouched, _ = pair(model_dirs)
    ids = input_batch(length=32)
    with torch.no_grad():
        target = full(input_ids=ids).logits
        after = float(output_kl(student(input_ids=ids).logits, target, torch.ones_like(ids)))
        before = float(output_kl(untouched(input_ids=ids).logits, target, torch.ones_like(ids)))
    assert after < before and summary["final_kl"] > 0 and summary["final_lm"] == 0.0


def test_distillation_in_bfloat16_trains_a_float32_emulator_and_ships_the_bundle_unchanged(model_dirs,
                                                                                         sample_text_file, tmp_path):
    from safetensors import safe_open

    from offsite.config import DeviceConfig
    from offsite.device import Placement
    sample_text_file.rename(tmp_path / "corpus.txt")
    full, student, plan = pair(model_dirs)
    _, untouched, _ = pair(model_dirs)
    settings = DistillConfig(corpus=str(tmp_path / "corpus.txt"), steps=6, lr=1e-3, batch_size=2, seq_len=32,
                             eval_every=2, lm_weight=0.0, kl_weight=0.0)
    distill(full, student, load_tokenizer(str(model_dirs["llama"])), plan, settings, read_corpus(settings),
            tmp_path / "ckpt", placement=Placement(torch.device("cpu"), torch.bfloat16))
    assert next(full.parameters()).dtype == torch.bfloat16  # the target is held in the compute dtype
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    ids = input_batch(length=32)
    full.float()
    assert kd_on(full, student, plan, ids) < kd_on(full, untouched, plan, ids)
    split = SplitConfig(emulator_layers=2)
    distilled = emulate(EmulateConfig(
        model=str(model_dirs["llama"]), output=str(tmp_path / "b"), split=split,
        distill=DistillConfig(corpus=str(tmp_path / "corpus.txt"), steps=2, batch_size=2, seq_len=32),
        runtime=DeviceConfig(device="cpu", dtype="bfloat16")))
    plain = emulate(EmulateConfig(model=str(model_dirs["llama"]), output=str(tmp_path / "plain"), split=split))
    assert read_manifest(distilled).fingerprint == read_manifest(plain).fingerprint
    with safe_open(str(next(distilled.glob("*.safetensors"))), framework="pt") as weights, \
            safe_open(str(next(plain.glob("*.safetensors"))), framework="pt") as original:
        assert {weights.get_tensor(n).dtype for n in weights.keys()} == {torch.float32}
        emulator_prefixes = tuple(f"model.layers.{2 + i}." for i in range(len(plan.emulator)))
        for name in original.keys():  # everything but the emulator ships exactly as the plain bundle's
            if not name.startswith(emulator_prefixes):
                assert torch.equal(weights.get_tensor(name), original.get_tensor(name)), name
