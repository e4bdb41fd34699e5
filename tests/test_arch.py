import pytest
from tiny_models import FAMILIES, make_tiny_model
from torch import nn

from offsite.arch import ARCHITECTURES, layer_paths, probe
from offsite.errors import OffsiteError


@pytest.mark.parametrize("family", FAMILIES)
def test_table_paths_exist_and_probe_agrees(family):
    model = make_tiny_model(family, num_layers=3)
    paths = layer_paths(model)
    assert len(model.get_submodule(paths.layers)) == 3
    assert model.get_submodule(paths.head) is model.get_output_embeddings()
    assert "norm" in type(model.get_submodule(paths.final_norm)).__name__.lower()
    assert probe(model) == paths


def test_unknown_type_is_probed():
    model = make_tiny_model("gpt2", num_layers=3)
    model.config.model_type = "my_new_gpt"
    assert layer_paths(model).layers == "transformer.h"


def test_unsupported_model_lists_supported_types():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)

    with pytest.raises(OffsiteError) as error:
        layer_paths(NoBlocks())
    assert "is not supported" in str(error.value)
    assert all(name in str(error.value) for name in ARCHITECTURES)
