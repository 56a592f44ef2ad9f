"""`robustdice` — the one console script; each package registers its own subcommands.

The node package composes the others (partitioner and mesh know nothing of each other), so the
dispatcher lives here. A subcommand module exposes `register(subparsers)`, which adds its
parsers and sets `func` on each: `func(args) -> int` is the exit status.
Errors derived from a package's error base print one line and exit 2; a reader that closed the
pipe (`robustdice status --json | head -1`) ends the command quietly with 141, as SIGPIPE would;
nothing else is caught, so a bug still shows its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

# Imported plainly: a module that cannot be imported (a broken pyzmq, say) fails here with its
# own traceback instead of leaving its subcommands out. None of them imports torch at import time.
from robustdice.mesh import cli as mesh_cli
from robustdice.mesh.errors import MeshError
from robustdice.node import client_cli
from robustdice.node.errors import NodeError
from robustdice.partitioner import cli as partitioner_cli
from robustdice.partitioner.errors import PartitionerError

SUBCOMMAND_MODULES = (partitioner_cli, mesh_cli, client_cli)
USER_ERRORS = (PartitionerError, MeshError, NodeError)


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors print one line naming the problem (the full usage is under --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="robustdice", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True
    for module in SUBCOMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"robustdice {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # What is still buffered would fail again at exit ("Exception ignored ..."): point
        # stdout at /dev/null so that the interpreter's last flush has somewhere to go.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
