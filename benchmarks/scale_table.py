"""On paper, toward the largest models: the data owner's memory and step cost against full fine-tuning.

For published configs (OPT-6.7B, Llama-3-8B, Llama-3-70B; the built-in model for scale) this
builds each model on the meta device (no weights, no download), splits it as `offsite emulate`
would, and applies two models:

- cost per training token: offsite.studies.bench.flops (the formula `offsite bench` prints);
- memory of weights and optimizer state (activations left out: they scale with batch x seq-len and
  are the same per trained block in both settings): a trained parameter holds float32 weight,
  gradient and two Adam moments (16 bytes); a frozen one its bfloat16 weight (2 bytes).

    python benchmarks/scale_table.py > /tmp/scale.md      # seconds; docs/scale.md shows its output
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offsite.config import SplitConfig
from offsite.emulator.split import plan_split
from offsite.studies.bench.flops import Plan, plan_modes, read_shapes, token_cost

GB = 1e9
TRAINED_BYTES, FROZEN_BYTES = 16, 2
SEQ_LEN, SCORED = 512, 1.0  # language modelling: a loss on every token
CONFIGS = {
    "SmolLM2-135M (built-in)": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                    vocab_size=49152, tie_word_embeddings=True),
    "OPT-6.7B": dict(model_type="opt", hidden_size=4096, ffn_dim=16384, num_hidden_layers=32,
                     num_attention_heads=32, vocab_size=50272, word_embed_proj_dim=4096),
    "Llama-3-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Llama-3-70B": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                        tie_word_embeddings=False),
}
SPLITS = {"2+2, default drop ratio": SplitConfig(bottom=2, top=2),
          "2+2, keep half the middle": SplitConfig(bottom=2, top=2, drop_ratio=0.5)}


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rows() -> list[str]:
    lines = ["| model | split | emulator layers | bundle (bf16) | data owner: weights + optimizer | "
             "full FT: weights + optimizer | memory ratio | cost per token ratio (FLOP limit) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, fields in CONFIGS.items():
        fields = dict(fields)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        shapes = read_shapes(model)
        blocks = model.get_submodule("model.layers" if config.model_type == "llama" else "model.decoder.layers")
        per_block = [parameters(block) for block in blocks]
        total = parameters(model)
        rest = total - sum(per_block)  # embeddings, final norm, head
        full_memory = TRAINED_BYTES * total
        full_cost = token_cost(shapes, Plan(["train"] * shapes.num_layers, SCORED), SEQ_LEN, 0)
        for split_name, split in SPLITS.items():
            plan = plan_split(shapes.num_layers, split)
            adapter = sum(per_block[i] for i in plan.adapter)
            emulator = sum(per_block[i] for i in plan.emulator)
            bundle = (adapter + emulator + rest) * FROZEN_BYTES
            owner_memory = TRAINED_BYTES * adapter + FROZEN_BYTES * (emulator + rest)
            modes = plan_modes(shapes.num_layers, plan.kept, plan.adapter, lora=False)
            cost = token_cost(shapes, Plan(modes, SCORED), SEQ_LEN, 0)
            lines.append(f"| {name} | {split_name} | {len(plan.emulator)} of {shapes.num_layers - len(plan.adapter)} "
                         f"| {bundle / GB:.1f} GB | {owner_memory / GB:.1f} GB | {full_memory / GB:.1f} GB "
                         f"| {full_memory / owner_memory:.1f}x | {full_cost / cost:.1f}x |")
    return lines


if __name__ == "__main__":
    print("\n".join(rows()))
