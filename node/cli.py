"""`robustdice` — the one console script; each package registers its own subcommands.

The node package composes the others (partitioner and mesh know nothing of each other), so the
dispatcher lives here. A subcommand module exposes `register(subparsers)`, which adds its
parsers and sets `func` on each: `func(args) -> int` is the exit status.
Errors derived from a package's error base print one line and exit 2; nothing else is caught,
so a bug still shows its traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


def _subcommand_modules():
    # Imported lazily so that `robustdice --help` does not pay for torch.
    from robustdice.partitioner import cli as partitioner_cli
    modules = [partitioner_cli]
    try:
        from robustdice.mesh import cli as mesh_cli
        modules.append(mesh_cli)
    except ImportError:  # the mesh is built in its own issue; the CLI works without it
        pass
    try:
        from robustdice.node import client_cli
        modules.append(client_cli)
    except ImportError:
        pass
    return modules


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors print one line naming the problem (the full usage is under --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="robustdice", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True
    for module in _subcommand_modules():
        module.register(sub)
    return parser


def _user_errors() -> tuple:
    errors = []
    from robustdice.partitioner.errors import PartitionerError
    errors.append(PartitionerError)
    try:
        from robustdice.mesh.errors import MeshError
        errors.append(MeshError)
    except ImportError:
        pass
    try:
        from robustdice.node.errors import NodeError
        errors.append(NodeError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        print(f"robustdice {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
