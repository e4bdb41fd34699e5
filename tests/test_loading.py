"""Loading models: mapped (transformers' default) or read into ordinary memory."""

from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, input_batch

from offsite.loading import load_model


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc")
@pytest.mark.parametrize("family", FAMILIES)
def test_in_memory_loading_gives_the_same_model_without_mapping_the_file(family, model_dirs):
    weights = str(model_dirs[family] / "model.safetensors")
    mapped = load_model(str(model_dirs[family]))
    assert weights in mapped_files()  # the default keeps the file mapped while its tensors live
    in_memory = load_model(str(model_dirs[family]), in_memory=True)
    ids = input_batch()
    assert torch.equal(in_memory(input_ids=ids).logits, mapped(input_ids=ids).logits)
    assert in_memory.get_output_embeddings().weight.data_ptr() == in_memory.get_input_embeddings().weight.data_ptr() \
        or not in_memory.config.tie_word_embeddings
    del mapped
    assert weights not in mapped_files()
