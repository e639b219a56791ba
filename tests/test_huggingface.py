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
    graph = graphopt.trace(model, (ids, mask))
    stream = PassManager([PruneChannels(ratio=0.5)]).run(graph).graph      # the hidden size too: no config has it
    with pytest.raises(ExportError, match=r"hidden size was pruned .*64 -> 32.*protected=\['model.embed_tokens'\]"):
        to_pretrained(stream, model)
    pruned = PassManager([PruneChannels(ratio=0.5, protected=["model.embed_tokens"])]).run(graph).graph
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


def test_gpt2_traced_on_keyword_inputs_prunes_its_mlp_and_reloads(tmp_path):
    """GPT-2's second positional input is its cache, so users pass the mask by keyword: the graph
    takes the dict's inputs in order, keeps batch and sequence symbolic by name, and its Conv1D
    layers go back in their own layout."""
    from torch.export import Dim

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4,
                                                                 vocab_size=100)).eval()
    ids, mask = _inputs()
    mask[1, :3] = 0
    dims = {0: Dim("batch", max=16), 1: Dim("seq", min=2, max=64)}
    graph = graphopt.trace(model, {"input_ids": ids, "attention_mask": mask},
                           dynamic_shapes={"input_ids": dims, "attention_mask": dims})
    assert graph.meta["input_names"] == ["input_ids", "attention_mask"]
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(graph.run(ids, mask)["logits"], expected, atol=1e-5)
    assert graph.run(torch.randint(0, 100, (3, 20)), torch.ones(3, 20, dtype=torch.long))["logits"].shape == (3, 20, 100)
    pruned = PassManager([PruneChannels(ratio=0.25, exclude=["*attn*"])]).run(graph).graph
    rebuilt = to_pretrained(pruned, model)
    rebuilt.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.n_inner == 192 and reloaded.transformer.h[0].mlp.c_fc.weight.shape == (64, 192)
    with torch.no_grad():
        got = reloaded(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(got, pruned.run(ids, mask)["logits"], atol=1e-5)


def test_keyword_inputs_the_model_does_not_take_are_named():
    class Two(nn.Module):
        def forward(self, x, scale=None):
            return x * (1 if scale is None else scale)

    with pytest.raises(graphopt.ConfigError, match=r"takes no input named 'y' \(it takes x, scale\)"):
        graphopt.trace(Two(), {"x": torch.randn(2), "y": torch.randn(2)})
    with pytest.raises(graphopt.ConfigError, match="dynamic_shapes names 'scal'"):
        graphopt.trace(Two(), {"x": torch.randn(2)}, dynamic_shapes={"scal": None})
    graph = graphopt.trace(Two(), {"scale": torch.full((2,), 3.0), "x": torch.ones(2)})   # dict order is the graph's
    assert torch.equal(graph.run(torch.full((2,), 2.0), torch.ones(2)), torch.full((2,), 2.0))


def test_a_graph_computing_something_the_config_cannot_build_is_refused():
    """The weights fit a config but the graph's computation was changed (here: its output
    doubled by an edit no config can say): the rebuilt model's outputs differ and nothing is
    returned."""
    model = _bert()
    graph = graphopt.trace(model, _inputs())
    hidden = next(n for n in graph.nodes if n.name.startswith("encoder_layer_1_output_layer_norm")
                  or n.target == "encoder.layer.1.output.LayerNorm")
    with graph.gm.graph.inserting_after(hidden):
        doubled = graph.gm.graph.call_function(torch.mul, (hidden, 2.0))
    hidden.replace_all_uses_with(doubled, delete_user_cb=lambda user: user is not doubled)
    graph.gm.recompile()
    with pytest.raises(ExportError, match=r"rebuilt BertModel differs from the graph \(relative error"):
        to_pretrained(graph, model)
