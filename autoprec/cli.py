"""The `autoprec` command: each subcommand is a few lines over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from autoprec.errors import AutoprecError


def cmd_layers(args: argparse.Namespace) -> None:
    from autoprec.space import load_space
    from autoprec.tables import format_table
    from autoprec.userspec import load_spec
    from autoprec.evaluate import resolve_device

    spec = load_spec(args.model)
    space = load_space(args.space)
    model = spec.new_model()
    choices = space.choices(model, resolve_device(args.device))
    rows = [(layer.name, layer.cls, "x".join(map(str, layer.weight_shape)), f"{layer.params:,}",
             ",".join(choices.get(layer.name, ())) or "(none on this device)")
            for layer in space.layers(model)]
    print(format_table(["layer", "class", "weight", "params", "formats"], rows))
    total = sum(layer.params for layer in space.layers(model))
    print(f"\n{len(rows)} searchable layers, {total:,} parameters, space {space.name!r} ({space.source})")


def cmd_apply(args: argparse.Namespace) -> None:
    from autoprec.report_apply import apply_and_compare

    print(apply_and_compare(args.policy, args.model, device=args.device))


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="SQLAlchemy URL of the study store (default: $AUTOPREC_STORAGE or "
                                     "sqlite:///autoprec.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoprec", description="Search per-layer numeric formats "
                                     "(fp32/fp16/bf16/int8) for a PyTorch model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Callable[[argparse.Namespace], None]] = {}

    p = sub.add_parser("layers", help="list the searchable layers of a model.py")
    p.add_argument("model", help="path to model.py")
    p.add_argument("--space", help="search-space YAML file or shipped name (default, cpu)")
    p.add_argument("--device", default="cpu", help="device whose format support filters the choices")
    commands["layers"] = cmd_layers

    p = sub.add_parser("apply", help="apply a policy file and measure it beside fp32")
    p.add_argument("policy", help="policy JSON written by `autoprec export`")
    p.add_argument("model", help="path to model.py")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    commands["apply"] = cmd_apply

    parser.set_defaults(_commands=commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args._commands[args.command](args)
    except AutoprecError as exc:
        print(f"autoprec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoprec: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
