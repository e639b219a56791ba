"""The ``graphopt`` command line: compress a model for a goal, run a pipeline file, inspect a model,
list passes and backends with the reference of their options.

Errors graphopt raises on purpose are printed as one line naming the problem (exit 2);
a pass that fails mid-pipeline prints the report so far and the failing pass (exit 1); a search
that finds no candidate within the goal still writes its report and exits 3.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import textwrap
import warnings

from graphopt import distributed
from graphopt.backend import get_backend, options_model, registered_backends
from graphopt.errors import ConfigError, GraphoptError, PassFailed
from graphopt.options import Options, option_reference, renamed_options
from graphopt.pass_base import get_pass, registered_passes
from graphopt.app.pipeline import ModelSpec, check_outputs, load_pipeline, resolve_callable, run_pipeline
from graphopt.report import human, pass_table, table, write_json
from graphopt.trace import trace


def _cmd_run(args) -> int:
    config = load_pipeline(args.pipeline)
    check_outputs(config, args.json)
    try:
        outcome = run_pipeline(config, progress=not args.quiet)
    except PassFailed as failure:
        if failure.records and distributed.is_main():
            print(pass_table(failure.records))
        print(f"error: {_on_rank(failure)}", file=sys.stderr)
        return 1
    if not distributed.is_main():   # under torchrun rank 0 prints the report and writes the files
        return 0
    print(f"pipeline {config.path} (captured by {outcome.graph.captured_by})\n")
    print(pass_table(outcome.records))
    if outcome.exports:
        print()
        print(table(["backend", "path", "size", "max abs err", "max rel err", "time s"],
                    [(e.backend, e.path, human(e.bytes, "B"), f"{e.max_abs_error:.2e}", f"{e.max_rel_error:.2e}",
                      f"{e.seconds:.2f}") for e in outcome.exports]))
    if outcome.metrics:
        print()
        names = list(outcome.metrics["before"])
        print(table(["metric", "before", "after", "change"],
                    [(n, f"{outcome.metrics['before'][n]:.4f}", f"{outcome.metrics['after'][n]:.4f}",
                      f"{outcome.metrics['after'][n] - outcome.metrics['before'][n]:+.4f}") for n in names]))
    if outcome.latency:
        print()
        base = outcome.latency["eager before"]
        print(table(["latency", "median ms", "vs eager before"],
                    [(k, f"{v:.3f}", f"{base / v:.2f}x") for k, v in outcome.latency.items()]))
    json_path = args.json or config.report_json
    if json_path:
        write_json(json_path, outcome.to_dict())
        print(f"\nreport written to {json_path}")
    return 0


def _model_from_argument(model: str, input_shape: str | None, checkpoint: str | None):
    if model.endswith(".toml"):
        spec = load_pipeline(model).model
    else:
        spec = ModelSpec(checkpoint=checkpoint)
        if ":" in model:
            resolve_callable(model, "MODEL")
            spec.factory = model
        else:
            spec.torchvision = model
        shape = "1,3,224,224" if input_shape is None else input_shape
        try:
            spec.input_shapes = [[int(d) for d in shape.split(",")]]
        except ValueError:
            raise ConfigError(f"--input-shape must be comma-separated integers, got {shape!r}") from None
        if any(d < 1 for d in spec.input_shapes[0]):
            raise ConfigError(f"--input-shape must be positive integers, got {shape!r}")
        spec.check_inputs("--input-shape")   # before the model is built: refused up front if too large
    inputs = spec.example_inputs()
    return spec.build(), inputs


def _prune_plan(graph, args) -> None:
    from graphopt.passes.prune_channels import PruneChannels

    pruner = PruneChannels(ratio=args.ratio if args.target_macs is None else None, target_macs=args.target_macs,
                           importance=args.importance, round_to=args.round_to)
    choice = pruner.plan(graph)
    rows = []
    for g in choice.plan.groups:
        removing = len(choice.removed.get(g.id, ()))
        status = "prunable" if g.prunable else "blocked: " + "; ".join(g.blocked)[:90]
        rows.append((g.id, g.name[:48], g.size, len(g.members), f"{removing}" if g.prunable else "-", status))
    print(table(["group", "layers", "channels", "members", "remove", "status"], rows))
    summary = choice.summary()
    cost = graph.analysis("cost")
    print(f"\n{summary['prunable']}/{summary['groups']} groups prunable; removing {summary['removed']} of "
          f"{summary['channels']} prunable channels; estimated MACs {human(choice.estimate['macs'])} "
          f"({choice.estimate['macs'] / cost.macs:.1%}), params {human(choice.estimate['params'])} "
          f"({choice.estimate['params'] / cost.params:.1%}); nothing has been changed")


def _cmd_inspect(args) -> int:
    model, inputs = _model_from_argument(args.model, args.input_shape, args.checkpoint)
    graph = trace(model, inputs)
    if args.prune_plan:
        _prune_plan(graph, args)
        return 0
    rows = [r for r in graph.summary() if r["kind"] not in ("output",)]
    print(table(["node", "kind", "target", "shape", "dtype", "params", "MACs"],
                [(r["node"], r["kind"], r["target"], "x".join(map(str, r["shape"])) if isinstance(r["shape"], tuple)
                  and all(isinstance(d, int) for d in r["shape"]) else "-", r["dtype"], human(r["params"]),
                  human(r["macs"])) for r in rows]))
    cost = graph.analysis("cost")
    dtypes = ", ".join(f"{k} {human(v, 'B')}" for k, v in cost.bytes_by_dtype.items())
    print(f"\n{len(rows)} nodes, captured by {graph.captured_by}; params {human(cost.params)}, "
          f"MACs {human(cost.macs)}, bytes {human(cost.bytes, 'B')} "
          f"({dtypes})")
    return 0


def _cmd_compress(args) -> int:
    from graphopt.search.spec import load_spec

    spec = load_spec(args.spec, out_dir=args.out)
    overrides = {k: v for k, v in (("max_minutes", args.max_minutes), ("max_trials", args.max_trials),
                                   ("objective", args.objective), ("max_drop", args.max_drop)) if v is not None}
    result = spec.run(progress=not args.quiet, resume=not args.fresh, **overrides)
    if distributed.is_main():
        print()
        print(result.summary())
    return 0 if result.chosen is not None else 3


def _first_sentence(doc: str | None) -> str:
    """A docstring's first sentence, on one line."""
    paragraph = inspect.cleandoc(doc or "").split("\n\n")[0]
    return " ".join(paragraph.split()).replace("``", "").split(". ")[0].rstrip(".")


def option_reference_text(model: type[Options], where: str) -> str:
    """The options of ``model`` as text: name, type, default and allowed values on one line, the
    description below it; then the rules across options and the deprecated names."""
    rows = option_reference(model)
    if not rows:
        return "no options"
    headers = ("option", "type", "default", "allowed")
    cells = [(r.name, r.type, r.default, r.allowed or "-") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = [f"options ({where}):", "  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  " + "  ".join("-" * w for w in widths)]
    for row, cell in zip(rows, cells):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip())
        if row.description:
            lines += textwrap.wrap(row.description, 100, initial_indent="      ", subsequent_indent="      ")
    base = model.__mro__[1]   # the pass's Rules
    if base is not Options and base.__doc__ and base.__doc__ != Options.__doc__:
        lines += ["", f"rules: {' '.join(inspect.cleandoc(base.__doc__).split())}"]
    renamed = renamed_options(model)
    if renamed:
        lines += ["", "deprecated (still taken, with a warning): "
                  + "; ".join(f"{old} -> {new}" for old, new in renamed.items())]
    return "\n".join(lines)


def _cmd_passes(args) -> int:
    if args.name:
        cls = get_pass(args.name)
        print(f"{cls.name}: {cls.summary()}")
        print(f"contract {cls.contract.value}; requires {', '.join(sorted(cls.requires)) or '-'}; "
              f"ensures {', '.join(sorted(cls.ensures)) or '-'}\n")
        print(option_reference_text(cls.options_model(), "keys of its [[passes]] table, or keyword arguments"))
        return 0
    print(table(["pass", "contract", "requires", "ensures", "description"],
                [(name, cls.contract.value, ",".join(sorted(cls.requires)) or "-",
                  ",".join(sorted(cls.ensures)) or "-", cls.summary())
                 for name, cls in registered_passes().items()]))
    print("\ngraphopt passes NAME: the options of a pass; graphopt backends: the backends")
    return 0


def _cmd_backends(args) -> int:
    if args.name:
        fn = get_backend(args.name)
        print(f"{args.name}: {_first_sentence(fn.__doc__)}\n")
        print(option_reference_text(options_model(args.name), "keys of its [[backends]] table besides name and path, "
                                                              "or keyword arguments"))
        return 0
    print(table(["backend", "description"],
                [(name, _first_sentence(fn.__doc__)) for name, fn in registered_backends().items()]))
    print("\ngraphopt backends NAME: the options of a backend")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description="Compress PyTorch models with verified graph passes.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a TOML pipeline and print the per-pass report")
    run.add_argument("pipeline", help="pipeline file (.toml)")
    run.add_argument("--json", help="write the report as JSON here (overrides [report] json)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(fn=_cmd_run)
    inspect = sub.add_parser("inspect", help="trace a model and print the IR per layer")
    inspect.add_argument("model", help="torchvision name, package.module:factory, or a pipeline .toml")
    inspect.add_argument("--input-shape", help="e.g. 1,3,224,224 (default)")
    inspect.add_argument("--checkpoint", help="state_dict to load into the model")
    inspect.add_argument("--prune-plan", action="store_true",
                         help="show channel groups, blocked groups and the channels pruning would remove")
    inspect.add_argument("--ratio", type=float, default=0.3, help="with --prune-plan: channel ratio (default 0.3)")
    inspect.add_argument("--target-macs", type=float, help="with --prune-plan: MACs budget instead of a ratio")
    inspect.add_argument("--importance", default="l2", help="with --prune-plan: l1, l2, bn_scale, fpgm")
    inspect.add_argument("--round-to", type=int, default=1, help="with --prune-plan: keep multiples of this")
    inspect.set_defaults(fn=_cmd_inspect)
    compress = sub.add_parser("compress", help="search pass pipelines for a goal (max drop; latency, size or "
                                                   "MACs) and write the chosen artifact, plots and a report")
    compress.add_argument("spec", help="compress spec (.toml): [model], [data], [evaluate], [goal], [output]")
    compress.add_argument("--out", help="output directory (overrides [output] dir)")
    compress.add_argument("--max-minutes", type=float, help="time budget (overrides [goal])")
    compress.add_argument("--max-trials", type=int, help="trial budget (overrides [goal])")
    compress.add_argument("--objective", help="latency, size or macs (overrides [goal])")
    compress.add_argument("--max-drop", type=float, help="allowed metric drop (overrides [goal])")
    compress.add_argument("--fresh", action="store_true", help="start the study again instead of resuming it")
    compress.add_argument("--quiet", action="store_true", help="no progress bars")
    compress.set_defaults(fn=_cmd_compress)
    passes = sub.add_parser("passes", help="list registered passes, or print one pass's option reference")
    passes.add_argument("name", nargs="?", help="a pass: print its options (type, default, allowed values)")
    passes.set_defaults(fn=_cmd_passes)
    backends = sub.add_parser("backends", help="list registered backends, or print one backend's option reference")
    backends.add_argument("name", nargs="?", help="a backend: print its options")
    backends.set_defaults(fn=_cmd_backends)
    return parser


def _on_rank(message: object) -> str:
    """An error's text, naming the rank under torchrun (each rank says its own)."""
    return f"rank {distributed.rank()}: {message}" if distributed.world_size() > 1 else str(message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a deprecated option name in a pipeline file is said on stderr (Python hides DeprecationWarnings
    # raised outside __main__ by default)
    warnings.filterwarnings("default", message=r"(pass|backend|observer) '.*': option '.*' .*is deprecated",
                            category=DeprecationWarning)
    distributed.init()   # launched by torchrun: join the process group before any work
    try:
        return args.fn(args)
    except GraphoptError as exc:
        print(f"error: {_on_rank(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
