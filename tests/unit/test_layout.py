"""The packages' layout holds: dependencies run one way, no import cycle, no command module
imported by a library, and every module imports on its own."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"partitioner": "robustdice.partitioner", "mesh": "robustdice.mesh", "node": "robustdice.node"}
# Modules that are commands (argparse and printing): libraries must not import them.
COMMANDS = {"robustdice.partitioner.cli", "robustdice.mesh.cli", "robustdice.node.cli", "robustdice.node.client_cli",
            "robustdice.node.lab.cluster"}
# partitioner's rooms, lowest first: a module imports from its own room and those below it, never
# from one above. The algorithm builds models and reads data from the zoo, the zoo knows no
# algorithm, and experiments measure what the other two make; errors.py (the one exception base),
# argtypes.py (every command's argparse types) and allocator.py import none of them; cli.py may import all.
PARTITIONER_ROOMS = (
    ("base", {"robustdice.partitioner", "robustdice.partitioner.errors", "robustdice.partitioner.argtypes",
              "robustdice.partitioner.allocator"}),
    ("zoo", {"robustdice.partitioner.zoo"}),
    ("core", {"robustdice.partitioner.core"}),
    ("experiments", {"robustdice.partitioner.experiments"}),
    ("cli", {"robustdice.partitioner.cli"}),
)


def modules():
    """{module name: path} of every module of the three packages."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package,) + parts)
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports(name, path, top_level_only):
    """The robustdice modules (and torch/zmq/...) that `name` imports."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            found.add(prefix)
            found.update(f"{prefix}.{a.name}" for a in node.names)
    known = modules()
    return {m for m in found if m in known or not m.startswith("robustdice")}


def test_no_import_cycle_at_module_level():
    known = modules()
    # A module's own parent packages are initialised before it anyway: not an edge of a cycle.
    graph = {m: {d for d in imports(m, p, False) if d in known and d != m and not m.startswith(d + ".")}
             for m, p in known.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)


def test_dependencies_run_one_way():
    """partitioner knows nothing of mesh or node; mesh knows nothing of torch, partitioner or node."""
    for name, path in modules().items():
        used = imports(name, path, top_level_only=False)
        if name.startswith("robustdice.partitioner"):
            bad = {m for m in used if m.startswith(("robustdice.mesh", "robustdice.node"))}
        elif name.startswith("robustdice.mesh"):
            bad = {m for m in used if m.split(".")[0] == "torch" or m.startswith(("robustdice.partitioner",
                                                                                     "robustdice.node"))}
        else:
            bad = set()
        assert not bad, f"{name} imports {sorted(bad)}"


def partitioner_room(name):
    """(index, name) of the room of PARTITIONER_ROOMS that holds the partitioner module `name`."""
    for index, (room, members) in enumerate(PARTITIONER_ROOMS):
        # The bare package robustdice.partitioner holds only itself; the others their submodules.
        if name in members or any(name.startswith(m + ".") for m in members - {"robustdice.partitioner"}):
            return index, room
    raise AssertionError(f"{name} lies in no room: put it in zoo/, core/ or experiments/ (PARTITIONER_ROOMS)")


def test_partitioner_imports_run_down_its_rooms():
    """experiments -> core -> zoo -> errors, argtypes; lazy imports count as well."""
    for name, path in modules().items():
        if not name.startswith("robustdice.partitioner"):
            continue
        index, room = partitioner_room(name)
        bad = sorted(f"{m} ({partitioner_room(m)[1]})" for m in imports(name, path, top_level_only=False)
                     if m.startswith("robustdice.partitioner") and partitioner_room(m)[0] > index)
        assert not bad, f"{name} ({room}) imports from a room above its own: {bad}"


def test_no_library_imports_a_command():
    for name, path in modules().items():
        if name in COMMANDS or name.endswith(("supervisor", "handler", "engine")):
            continue   # commands and process mains may register other commands
        bad = imports(name, path, top_level_only=False) & COMMANDS
        assert not bad, f"{name} imports the command module(s) {sorted(bad)}"


def test_every_module_imports_on_its_own():
    """Each module first in a fresh robustdice namespace: an import that only works after another
    module was loaded (a hidden cycle or a missing import) fails here."""
    names = sorted(modules())
    script = (
        "import importlib, sys\n"
        "import torch, zmq, numpy\n"   # third-party modules stay loaded: they cost most of the time
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('robustdice')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(" + repr(names) + "))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"imported {len(names)}" in proc.stdout


def test_pytest_m_security_selects_the_security_cases_outside_tests_security():
    """conftest marks them (SECURITY_FILES); once a second hook of the same name silently
    replaced the one that did, and `pytest -m security` left them out."""
    files = ["tests/integration/test_keys_cli.py", "tests/unit/test_layout.py"]
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist",
                          "-p", "no:cacheprovider", "-m", "security", *files],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    chosen = [line.split("::")[0] for line in out.stdout.splitlines() if "::" in line]
    assert chosen and set(chosen) == {"tests/integration/test_keys_cli.py"}, out.stdout[-2000:] + out.stderr[-2000:]
