"""A pruned Hugging Face model goes back to a model whose config builds it: save_pretrained and
from_pretrained give the pruned graph's outputs; configs that cannot say the result are refused."""
import pytest
import torch
from torch import nn

import graphopt
from graphopt import ExportError, PassManager
from graphopt.huggingface import to_pretrained
from graphopt.passes import PruneChannels

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    return transformers.BertModel(config).eval()


def _inputs():
    torch.manual_seed(1)
    return torch.randint(0, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long)


def test_pruned_llama_saves_and_reloads_with_its_new_sizes(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    model = transformers.LlamaForCausalLM(config).eval()
    ids, mask = _inputs()
    pruned = PassManager([PruneChannels(ratio=0.5)]).run(graphopt.trace(model, (ids, mask))).graph
    rebuilt = to_pretrained(pruned, model)
    rebuilt.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert (reloaded.config.intermediate_size, reloaded.config.num_attention_heads,
            reloaded.config.num_key_value_heads) == (64, 2, 1)
    assert reloaded.model.layers[1].self_attn.k_proj.weight.shape == (16, 64)
    with torch.no_grad():
        got = reloaded(ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(got, pruned.run(ids, mask)["logits"], atol=1e-5)
    assert model.config.intermediate_size == 128                     # the caller's model is untouched


def test_bert_feed_forward_pruning_goes_back_and_its_heads_are_refused_by_name(tmp_path):
    model = _bert()
    ids, mask = _inputs()
    graph = graphopt.trace(model, (ids, mask))
    mlp_only = PassManager([PruneChannels(ratio=0.25, exclude=["*attention*"])]).run(graph).graph
    rebuilt = to_pretrained(mlp_only, model)
    rebuilt.save_pretrained(tmp_path)
    reloaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.intermediate_size == 96 and reloaded.config.num_attention_heads == 4
    with torch.no_grad():
        got = reloaded(ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(got, mlp_only.run(ids, mask)["last_hidden_state"], atol=1e-5)

    heads = PassManager([PruneChannels(ratio=0.5)]).run(graph).graph
    with pytest.raises(ExportError, match=r"BertConfig.*attention\.self\.query\.weight \(64, 64\) -> \(32, 64\)"):
        to_pretrained(heads, model)


def test_layers_of_different_widths_are_refused_with_the_sizes():
    model = _bert()
    graph = graphopt.trace(model, _inputs())
    uneven = PassManager([PruneChannels(ratio=0.25, exclude=["*attention*"],
                                        overrides={"encoder.layer.0.intermediate.dense": 0.5})]).run(graph).graph
    with pytest.raises(ExportError, match=r"one size per model.*scope='uniform'") as info:
        to_pretrained(uneven, model)
    assert "encoder.layer.0.intermediate.dense.weight (128, 64) -> (64, 64)" in str(info.value)


def test_only_the_hugging_face_model_the_graph_came_from_is_taken():
    plain = nn.Sequential(nn.Linear(4, 4))
    graph = graphopt.trace(plain, torch.randn(1, 4))
    with pytest.raises(ExportError, match="needs the Hugging Face model"):
        to_pretrained(graph, plain)
