"""What every benchmark shares, written once: top-1 accuracy over a loader, latency of runners
timed side by side, eager and onnxruntime runners, the process set-up a timing needs, int8 target
lists on the command line, and results written as JSON with their Markdown tables beside them.

    python -m benchmarks.harness render [--results bench-results] [--docs benchmarks/results] [FILE.json ...]

``render`` rebuilds the Markdown of every benchmark JSON in ``--results`` (``NAME.md`` beside
``NAME.json``, with the benchmark's own ``markdown`` function) and replaces, in the documents under
``--docs``, each block

    <!-- render: NAME.json -->
    ...
    <!-- /render -->

by the tables of ``--results``/NAME.json where that file exists and names its renderer (other
blocks are left as recorded).

Benchmarks run from the repository root (``python -m benchmarks.bench_prune speed``); nothing here
is installed with graphopt. No benchmark changes the process at import: thread counts and
environment variables are set in its ``main()`` (``run_with_env``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from typing import Any, Callable, Iterable

RESULTS = "bench-results"
DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: display names of the models the benchmarks use
MODEL_NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50", "mobilenet_v2": "MobileNetV2",
               "mobilenet_v3_large": "MobileNetV3", "efficientnet_b0": "EfficientNet-B0",
               "shufflenet_v2_x1_0": "ShuffleNetV2", "squeezenet1_0": "SqueezeNet 1.0", "alexnet": "AlexNet",
               "convnext_tiny": "ConvNeXt-T", "vit_b_16": "ViT-B/16", "vgg16": "VGG-16",
               "minilm": "all-MiniLM-L6-v2", "fashion_cnn": "Fashion-MNIST CNN"}


def model_name(name: str) -> str:
    return MODEL_NAMES.get(name, name)


# -- process set-up ---------------------------------------------------------------------------------
def run_with_env(**values: str) -> None:
    """Start this program again with the environment variables among ``values`` that are not set
    yet (``os.execv``, same interpreter and arguments): OpenMP reads them once, when torch loads,
    so a benchmark that needs them calls this in ``main()`` before any work. A variable the caller
    set already is kept as it is."""
    missing = {name: value for name, value in values.items() if name not in os.environ}
    if missing:
        os.environ.update(missing)
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def parse_targets(text: str) -> list[str]:
    """``--targets``: comma-separated names of graphopt.quant.targets (or ``auto``), each once."""
    from graphopt.quant.targets import TARGET_NAMES

    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in names if t not in TARGET_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown target(s) {', '.join(unknown) or '(none)'}; "
                                         f"known: {', '.join(TARGET_NAMES)}")
    return names


def add_targets_option(parser: argparse.ArgumentParser, what: str = "each run once per target") -> None:
    """The accuracy benchmarks' ``--targets``: int8 targets, ``x86-vnni,x86-avx2`` by default."""
    parser.add_argument("--targets", type=parse_targets, default="x86-vnni,x86-avx2",
                        help=f"comma-separated int8 targets, {what} (default: x86-vnni,x86-avx2)")


# -- what is measured -------------------------------------------------------------------------------
def accuracy(model, data: Iterable | None = None, batch_size: int = 256) -> float:
    """Top-1 accuracy, a share in [0, 1], of a Graph, a module or an artifact's runner over
    ``data`` ((inputs, labels) batches); by default the Fashion-MNIST test set (10 000 images) in
    batches of ``batch_size``."""
    from graphopt.app.evaluate import top1_accuracy
    from graphopt.tools import fashion_mnist

    return top1_accuracy(model, fashion_mnist.test_batches(batch_size) if data is None else data)


def latency(runners: dict[str, Callable[..., Any]], inputs: tuple = (), rounds: int = 20,
            **options) -> dict[str, float]:
    """Median milliseconds per call of each runner, called with ``inputs``: the runners
    interleaved round by round (graphopt.app.latency.interleaved_latency; ``options``: warmup,
    inner, hot), so drift on a shared machine hits them alike."""
    from graphopt.app.latency import interleaved_latency

    seconds = interleaved_latency({name: (lambda run=run: run(*inputs)) for name, run in runners.items()},
                                  rounds, **options)
    return {name: 1e3 * value for name, value in seconds.items()}


def eager_runner(module, channels_last: bool = False) -> Callable[..., Any]:
    """``run(*inputs)``: ``module`` called without autograd. ``channels_last`` runs a copy with
    its weights in that layout (give it inputs already converted: a conversion inside the timed
    call would be timed too)."""
    import copy

    import torch

    if channels_last:
        module = copy.deepcopy(module).to(memory_format=torch.channels_last)

    def run(*inputs):
        with torch.no_grad():
            return module(*inputs)
    return run


def onnx_file(graph, path: str, tolerance: float = 1e-3, **options) -> str:
    """``graph`` written by graphopt's fp32 ONNX backend to ``path`` (checked in onnxruntime
    within ``tolerance``: random weights reach large activations); returns ``path``."""
    from graphopt.backends import onnx as onnx_backend

    onnx_backend.export(graph, path, tolerance=tolerance, **options)
    return path


def ort_runner(path: str, threads: int) -> Callable[..., Any]:
    """``run(*inputs)``: an onnxruntime session of the file at ``path`` on ``threads`` intra-op
    threads with spinning off (so it does not slow the torch runs timed beside it), fed tensors."""
    from graphopt.backends import onnx as onnx_backend

    session = onnx_backend.ort_session(path, threads)
    return lambda *inputs: onnx_backend.run_onnx(session, inputs)


# -- results ----------------------------------------------------------------------------------------
def _qualified(fn: Callable) -> str:
    module = fn.__module__
    if module == "__main__":   # run as python -m benchmarks.NAME
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec else module
    return f"{module}:{fn.__qualname__}"


def _renderer(name: str) -> Callable[[dict], str]:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def write_results(path: str, results: dict, markdown: Callable[[dict], str]) -> str:
    """Write ``results`` as JSON to ``path`` and the tables ``markdown`` makes of that JSON
    beside it (``.md``); the JSON names its renderer, so ``render`` can rebuild the tables later.
    Returns the Markdown."""
    from graphopt.report import write_json

    write_json(path, {**results, "rendered_by": _qualified(markdown)})
    return render_file(path)


def render_file(path: str, renderer: str | None = None) -> str:
    """Rebuild ``NAME.md`` beside the benchmark JSON ``path``; returns its text."""
    with open(path) as f:
        results = json.load(f)
    name = renderer or results.get("rendered_by")
    if not name:
        raise ValueError(f"{path} names no renderer (written before benchmarks.harness): pass one as module:function")
    text = _renderer(name)(results).rstrip() + "\n"
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(text)
    return text


_BLOCK = re.compile(r"(<!-- render: (?P<name>[^ ]+\.json) -->\n)(?P<body>.*?)(<!-- /render -->)", re.S)


def render_docs(results_dir: str, docs_dir: str) -> list[str]:
    """Replace each ``<!-- render: NAME.json -->`` block in the Markdown files of ``docs_dir`` by
    the tables of ``results_dir``/NAME.json, where that file exists; returns what was replaced."""
    replaced = []
    for doc in sorted(f for f in os.listdir(docs_dir) if f.endswith(".md")):
        path = os.path.join(docs_dir, doc)
        with open(path) as f:
            text = f.read()

        def fill(match: re.Match) -> str:
            source = os.path.join(results_dir, match["name"])
            if not os.path.exists(source):
                return match[0]
            with open(source) as f:
                results = json.load(f)
            if "rendered_by" not in results:   # written before the harness: left as recorded
                return match[0]
            replaced.append(f"{doc}: {match['name']}")
            return match[1] + _renderer(results["rendered_by"])(results).rstrip() + "\n" + match[4]

        new = _BLOCK.sub(fill, text)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
    return replaced


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild benchmark tables from their JSON results.")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="NAME.md beside every NAME.json; the render blocks of the documents")
    render.add_argument("files", nargs="*", help="JSON files (default: every one in --results that names a renderer)")
    render.add_argument("--results", default=RESULTS)
    render.add_argument("--docs", default=DOCS, help="folder of Markdown documents with render blocks")
    args = parser.parse_args(argv)
    files = args.files
    if not files and os.path.isdir(args.results):
        files = sorted(os.path.join(args.results, f) for f in os.listdir(args.results) if f.endswith(".json"))
    for path in files:
        with open(path) as f:
            named = "rendered_by" in json.load(f)
        if named:
            render_file(path)
            print(f"wrote {os.path.splitext(path)[0]}.md")
        else:
            print(f"skipped {path}: it names no renderer")
    for block in render_docs(args.results, args.docs):
        print(f"updated {block}")


if __name__ == "__main__":
    main()
