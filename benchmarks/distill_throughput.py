"""Seconds per distillation step on the built-in model (2-8-2, 4 x 256 tokens of austen), before and after.

    python benchmarks/distill_throughput.py new-kdlm | new-kd | new-kd-cached
    git worktree add /tmp/old-tree dfa35b0 && python benchmarks/distill_throughput.py old --old-src /tmp/old-tree/src

`old` times the distillation step of an older checkout (both models run to the head); `new-kdlm` the
current step with the LM loss (the full model stops at the end of its middle block); `new-kd` without it
(both stop there); `new-kd-cached` a later epoch, the full model's outputs kept. Run it alone: the two
cores are easily shared.
"""
import copy, json, sys, time
which = sys.argv[1]
if which == "old":
    sys.path.insert(0, sys.argv[sys.argv.index("--old-src") + 1])
import torch
from offsite.loading import load_model, load_tokenizer
from offsite.config import SplitConfig, DistillConfig
from offsite.emulator.split import plan_split
from offsite.emulator.surgery import keep_layers
from offsite.emulator import distill as D
from offsite.data.builtin import load_builtin
from offsite.data.tokens import lm_sequences
print(D.__file__, file=sys.stderr)
full = load_model("smollm2-135m"); tok = load_tokenizer("smollm2-135m")
plan = plan_split(30, SplitConfig(emulator_layers=8))
student = copy.deepcopy(full); keep_layers(student, plan.kept)
student.requires_grad_(False)
emu = [student.model.layers[2 + i] for i in range(8)]
for l in emu: l.requires_grad_(True)
opt = torch.optim.AdamW([p for l in emu for p in l.parameters()], lr=1e-4)
lm = 0.0 if which.startswith("new-kd") else 1.0
settings = DistillConfig(corpus="austen", lm_weight=lm)
seqs = lm_sequences(tok, load_builtin("austen", "train").texts, 256)
pairs = D.alignment_targets(plan, "final")
times = []
if which != "old":
    teacher = D.TeacherOutputs(full, {f for _, f in pairs}, keep=which == "new-kd-cached")
    if which == "new-kd-cached":  # the first pass fills the store; the timed pass is a later epoch
        with torch.no_grad():
            for step in range(18):
                from offsite.data.tokens import collate
                b = collate(seqs[step * 4:(step + 1) * 4], tok.pad_token_id)
                teacher.batch(list(range(step * 4, step * 4 + 4)), {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
for step in range(18):
    batch = seqs[step * 4:(step + 1) * 4]
    t = time.perf_counter()
    if which == "old":
        D._step(full, student, batch, tok.pad_token_id, pairs, settings, opt, step + 1)
    else:
        D._step(teacher, student, list(range(step * 4, step * 4 + 4)), batch, tok.pad_token_id, pairs, settings, opt, step + 1)
    times.append(time.perf_counter() - t)
per = sum(times[3:]) / len(times[3:])
print(json.dumps({"code": which, "s_per_step": round(per, 3), "tokens_per_s": round(4 * 256 / per, 1), "threads": torch.get_num_threads()}))
