"""The models the zoo sweep builds: which ones (a rule per zoo, not a list of what passes), how each
is built with random weights, and the inputs it is traced, calibrated and checked on.

- timm: every family (``timm.list_modules()``), ``1 + floor(log4(n))`` architectures from a family
  of ``n`` distinct architectures (resolution variants counted once, ``test_*`` models left out),
  taken round-robin over the family's name stems (``resnet``, ``seresnext``, ``tf_efficientnet``,
  ...), smallest first by parameter count (counted on the meta device), at most 100 M parameters
  unless the family has nothing smaller; plus the most used timm models (``POPULAR``).
  ``python -m benchmarks.zoo_sweep select`` re-derives the list into ``zoo_models.json``.
- Hugging Face transformers: ``HF`` below, small random configs (hidden 64, 2 layers, 4 heads),
  encoders, decoders (RoPE, RMSNorm, grouped-query attention), vision encoders, encoder-decoders.
- torchvision: all classification models.

Input sizes are small where the model allows (64 px first, then the model's own size).
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

CATALOGUE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo_models.json")
SMALL_SIZE = 64
MAX_PARAMS = 100e6
BATCH = 2
SEQ = 16
VOCAB = 512

# the timm models users bring most (timm's most downloaded architectures), always swept
POPULAR = ["resnet50", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_large_100", "convnext_tiny",
           "vit_small_patch16_224", "deit_small_patch16_224", "regnety_016"]


@dataclass
class Spec:
    zoo: str
    model: str
    family: str
    params: float | None = None          # millions, where known before building
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.zoo}:{self.model}"


# -- Hugging Face: small random configs ---------------------------------------------------------
_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=VOCAB, max_position_embeddings=128, use_cache=False)
_DECODER = dict(_TEXT, num_key_value_heads=2, head_dim=16)   # grouped-query attention: 2 kv heads for 4
_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
               patch_size=8, num_channels=3)

# name -> (model_type, config overrides, inputs: "text" | "vision" | "seq2seq")
HF: dict[str, tuple[str, dict, str]] = {
    # encoders
    "bert": ("bert", _TEXT, "text"),
    "roberta": ("roberta", _TEXT, "text"),
    "distilbert": ("distilbert", dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                      max_position_embeddings=128), "text"),
    "albert": ("albert", dict(_TEXT, embedding_size=32), "text"),
    "electra": ("electra", dict(_TEXT, embedding_size=32), "text"),
    "deberta-v2": ("deberta-v2", _TEXT, "text"),
    "xlm-roberta": ("xlm-roberta", _TEXT, "text"),
    "mpnet": ("mpnet", _TEXT, "text"),
    "roformer": ("roformer", dict(_TEXT, embedding_size=64), "text"),
    "modernbert": ("modernbert", dict(_TEXT, global_attn_every_n_layers=1, local_attention=16, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, sep_token_id=2, cls_token_id=1), "text"),
    # decoders
    "gpt2": ("gpt2", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, use_cache=False),
             "text"),
    "gpt_neo": ("gpt_neo", dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                                attention_types=[[["global", "local"], 1]], max_position_embeddings=128,
                                window_size=8, use_cache=False), "text"),
    "gptj": ("gptj", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128,
                          use_cache=False), "text"),
    "gpt_neox": ("gpt_neox", dict(_TEXT, rotary_pct=0.5), "text"),
    "opt": ("opt", dict(_TEXT, ffn_dim=128, word_embed_proj_dim=64), "text"),
    "bloom": ("bloom", dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, use_cache=False), "text"),
    "falcon": ("falcon", dict(_TEXT, num_kv_heads=2, new_decoder_architecture=True), "text"),
    "llama": ("llama", _DECODER, "text"),
    "mistral": ("mistral", dict(_DECODER, sliding_window=8), "text"),
    "qwen2": ("qwen2", _DECODER, "text"),
    "qwen3": ("qwen3", _DECODER, "text"),
    "phi": ("phi", dict(_TEXT, partial_rotary_factor=0.5), "text"),
    "phi3": ("phi3", dict(_DECODER, pad_token_id=0), "text"),
    "gemma": ("gemma", _DECODER, "text"),
    "gemma2": ("gemma2", dict(_DECODER, sliding_window=8), "text"),
    "stablelm": ("stablelm", dict(_DECODER, partial_rotary_factor=0.25), "text"),
    "olmo": ("olmo", _DECODER, "text"),
    "starcoder2": ("starcoder2", _DECODER, "text"),
    # vision encoders
    "vit": ("vit", _VISION, "vision"),
    "deit": ("deit", _VISION, "vision"),
    "swin": ("swin", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4),
             "vision"),
    "convnext": ("convnext", dict(image_size=32, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_channels=3), "vision"),
    # encoder-decoders
    "t5": ("t5", dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, use_cache=False,
                      decoder_start_token_id=0), "seq2seq"),
    "bart": ("bart", dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                          decoder_ffn_dim=128, max_position_embeddings=128, use_cache=False), "seq2seq"),
}


class Seq2Seq(nn.Module):
    """``model(input_ids=..., decoder_input_ids=...).last_hidden_state``, called positionally."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).last_hidden_state


def _images(size: int) -> Callable[[int], tuple]:
    return lambda seed: (torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed)),)


def _tokens(count: int) -> Callable[[int], tuple]:
    def make(seed: int) -> tuple:
        gen = torch.Generator().manual_seed(seed)
        return tuple(torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(count))
    return make


def build_hf(name: str) -> tuple[nn.Module, Callable[[int], tuple], str]:
    import transformers
    from transformers import AutoConfig, AutoModel

    transformers.logging.set_verbosity_error()
    model_type, overrides, inputs = HF[name]
    config = AutoConfig.for_model(model_type, **overrides)
    model = AutoModel.from_config(config).eval()
    if inputs == "seq2seq":
        return Seq2Seq(model), _tokens(2), f"{BATCH}x{SEQ} ids + {BATCH}x{SEQ} decoder ids"
    if inputs == "vision":
        return model, _images(config.image_size), f"{BATCH}x3x{config.image_size}x{config.image_size}"
    return model, _tokens(1), f"{BATCH}x{SEQ} ids"


# -- images: timm and torchvision, small inputs where the model takes them -------------------------
def _sized(make: Callable[..., nn.Module], size_kwarg: str, sizes: list[int]) -> tuple[nn.Module, int]:
    """The model built for the first size in ``sizes`` it runs at (with ``size_kwarg`` where its
    constructor takes one); the last error if none."""
    error: Exception | None = None
    for size in dict.fromkeys(sizes):
        for kwargs in ({size_kwarg: size}, {}):
            try:
                model = make(**kwargs).eval()
                with torch.no_grad():
                    model(torch.randn(1, 3, size, size))
                return model, size
            except Exception as exc:   # too small for this model, or no such argument: try the next
                error = exc
    raise RuntimeError(f"no input size among {sorted(set(sizes))} runs: {type(error).__name__}: {error}")


def build_timm(name: str) -> tuple[nn.Module, Callable[[int], tuple], str]:
    import timm

    cfg = timm.get_pretrained_cfg(name)
    default = (cfg.input_size[-1] if cfg is not None and cfg.input_size else 224)
    model, size = _sized(lambda **kw: timm.create_model(name, pretrained=False, num_classes=10, **kw), "img_size",
                         [SMALL_SIZE, 2 * SMALL_SIZE, default])
    return model, _images(size), f"{BATCH}x3x{size}x{size}"


def build_torchvision(name: str) -> tuple[nn.Module, Callable[[int], tuple], str]:
    import torchvision

    default = 299 if name == "inception_v3" else 224
    model, size = _sized(lambda **kw: torchvision.models.get_model(name, weights=None, num_classes=10, **kw),
                         "image_size", [SMALL_SIZE, 2 * SMALL_SIZE, default])
    return model, _images(size), f"{BATCH}x3x{size}x{size}"


BUILDERS = {"timm": build_timm, "hf": build_hf, "torchvision": build_torchvision}


# -- selection ------------------------------------------------------------------------------------
def _architecture(name: str) -> str:
    """A timm name without its input-resolution suffix (``cait_xxs24_384`` -> ``cait_xxs24``)."""
    return re.sub(r"_(1[2-9]\d|[2-9]\d\d)$", "", name)


def _stem(name: str) -> str:
    parts = name.split("_")
    two = parts[0] in ("tf", "legacy", "vit", "eva", "eva02", "gc", "ecaresnet", "seresnext", "resnetv2")
    return "_".join(parts[:2]) if two else parts[0]


def choose_timm(params: dict[str, tuple[str, float]]) -> list[dict]:
    """The rule of the module docstring over ``{name: (family, params)}``."""
    families: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for name, (family, count) in params.items():
        if not name.startswith("test_"):
            families[family].append((count, name))
    chosen = []
    for family in sorted(families):
        seen, distinct = set(), []
        for count, name in sorted(families[family]):
            if _architecture(name) not in seen:
                seen.add(_architecture(name))
                distinct.append((count, name))
        small = [(c, n) for c, n in distinct if c <= MAX_PARAMS] or distinct[:1]
        k = min(len(small), 1 + int(math.log(len(distinct), 4)))
        stems: dict[str, list] = collections.OrderedDict()
        for item in small:
            stems.setdefault(_stem(item[1]), []).append(item)
        picks, depth = [], 0
        while len(picks) < k:
            for items in stems.values():
                if depth < len(items) and len(picks) < k:
                    picks.append(items[depth])
            depth += 1
        chosen += [{"model": n, "family": family, "params": round(c / 1e6, 2)} for c, n in picks]
    names = {row["model"] for row in chosen}
    chosen += [{"model": n, "family": params[n][0], "params": round(params[n][1] / 1e6, 2), "popular": True}
               for n in POPULAR if n not in names and n in params]
    return chosen


def count_timm_params() -> dict[str, tuple[str, float]]:
    """Every timm architecture's family and parameter count, built on the meta device (minutes)."""
    import timm

    counts = {}
    for family in timm.list_modules():
        for name in timm.list_models(module=family):
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, pretrained=False, num_classes=10)
                counts[name] = (family, float(sum(p.numel() for p in model.parameters())))
            except Exception:   # a constructor that needs real tensors: counted as large, chosen last
                counts[name] = (family, math.inf)
    return counts


def select_timm(path: str = CATALOGUE) -> list[dict]:
    import timm

    chosen = choose_timm(count_timm_params())
    with open(path, "w") as f:
        json.dump({"rule": __doc__.split("- timm: ")[1].split("\n- ")[0].replace("\n  ", " "),
                   "timm": timm.__version__, "families": len(timm.list_modules()), "models": chosen}, f, indent=1)
        f.write("\n")
    return chosen


def specs(zoos: list[str]) -> list[Spec]:
    out: list[Spec] = []
    for zoo in zoos:
        if zoo == "timm":
            with open(CATALOGUE) as f:
                out += [Spec("timm", r["model"], r["family"], r["params"]) for r in json.load(f)["models"]]
        elif zoo == "hf":
            out += [Spec("hf", name, {"text": "encoder", "vision": "vision", "seq2seq": "encoder-decoder"}[kind]
                         if name in _ENCODERS or kind != "text" else "decoder")
                    for name, (_, _, kind) in HF.items()]
        elif zoo == "torchvision":
            import torchvision

            out += [Spec("torchvision", name, _tv_family(name))
                    for name in torchvision.models.list_models(module=torchvision.models)]
        else:
            raise SystemExit(f"unknown zoo {zoo!r}: timm, hf, torchvision")
    return out


_ENCODERS = {"bert", "roberta", "distilbert", "albert", "electra", "deberta-v2", "xlm-roberta", "mpnet", "roformer",
             "modernbert"}


def _tv_family(name: str) -> str:
    return re.match(r"[a-z]+(?:net|_v\d)?", name).group(0).rstrip("_")
