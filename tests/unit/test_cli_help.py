"""Every option of every command says what it does and, unless it is off by default, its default.

The rule: each option and positional argument has a help text. An option that is not required
and whose default is not "off" must name its default in its help, after the word "default"
("default 0.1", "(default: 500)"). Off means the option changes nothing unless given: a default
of None or False, a repeatable option's empty list, a counter's 0.
"""
import argparse
import re

import pytest

from robustdice.node.cli import build_parser as robustdice_parser
from robustdice.node.supervisor import build_parser as node_parser


def _parsers():
    """(command, parser) for the `robustdice-node` parser, `robustdice` and each subcommand."""
    yield "robustdice-node", node_parser()
    root = robustdice_parser()
    yield "robustdice", root
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"robustdice {name}", sub


PARSERS = list(_parsers())


def _off(action: argparse.Action) -> bool:
    default = action.default
    return (default is None or default is False or default == argparse.SUPPRESS
            or (isinstance(action, argparse._AppendAction) and default == [])
            or (isinstance(action, argparse._CountAction) and default == 0))


def _default_texts(default) -> set:
    texts = {str(default)}
    if isinstance(default, float):
        texts.add(f"{default:g}")
    return texts


def problems(command: str, parser: argparse.ArgumentParser):
    out = []
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help or action.help == argparse.SUPPRESS:
            out.append(f"{command} {name}: no help text")
            continue
        if action.required or not action.option_strings or _off(action):
            continue
        text = formatter._expand_help(action)
        after = text[text.find("default"):] if "default" in text else ""
        if not any(re.search(rf"(?<![\w.]){re.escape(t)}(?![\w])", after) for t in _default_texts(action.default)):
            out.append(f"{command} {name}: help {text!r} does not give its default {action.default!r}")
    return out


def test_the_walk_reaches_every_command():
    commands = {c for c, _ in PARSERS}
    assert {"robustdice-node", "robustdice partition", "robustdice verify", "robustdice evaluate",
            "robustdice keys", "robustdice inventory", "robustdice submit", "robustdice status",
            "robustdice cluster"} <= commands


@pytest.mark.parametrize("command,parser", PARSERS, ids=[c for c, _ in PARSERS])
def test_every_option_has_help_that_gives_its_default(command, parser):
    assert problems(command, parser) == []


def test_the_check_fails_on_a_missing_help_or_default():
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--bare", type=int)
    p.add_argument("--rate", type=float, default=50.0, help="frames per second")
    p.add_argument("--wrong", type=int, default=3, help="a count (default 30)")
    p.add_argument("--stated", type=float, default=50.0, help="frames per second (default %(default)s)")
    p.add_argument("--flag", action="store_true", help="off unless given")
    assert problems("x", p) == [
        "x --bare: no help text",
        "x --rate: help 'frames per second' does not give its default 50.0",
        "x --wrong: help 'a count (default 30)' does not give its default 3",
    ]


def test_a_broken_pyzmq_is_an_import_error_not_a_missing_command():
    """`robustdice keys` once answered "invalid choice: keys" when pyzmq failed to import."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['zmq'] = None\n"   # what a broken pyzmq install looks like to Python
            "from robustdice.node.cli import main\n"
            "sys.exit(main(['keys', '--help']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "invalid choice" not in proc.stderr
    assert "ModuleNotFoundError" in proc.stderr and "zmq" in proc.stderr, proc.stderr[-2000:]
