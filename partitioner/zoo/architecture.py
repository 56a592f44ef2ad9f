"""A model's architecture as data: its torch.fx graph, stored in the plan, rebuilt with torch alone.

A user's own CNN comes from their code (`--model package.module:factory`), which the boards
should not need. Symbolic tracing inlines every user class and function, leaving a graph of
torch's own modules (Conv2d, BatchNorm2d, ...), torch functions, tensor methods and operators.
`encode(gm)` writes that graph as JSON, `build(data)` makes a GraphModule from it again:

    name     the model's class name (messages name it)
    modules  {fx path: {"class": torch.nn class name, "args": constructor arguments}}
             (arguments read back from the module's attributes; those equal to the
             constructor's default are left out, so that an older torch reads them too)
    tensors  {fx path: {"kind": "parameter" | "buffer", "shape": [...], "dtype": "float32"}}
             (tensors the graph reads directly: parameters of user modules, constants)
    nodes    [{"name", "op", "target", "args", "kwargs"}] in graph order; a function target
             is its public name (torch.flatten, torch.nn.functional.relu, operator.add)

Values inside args are JSON, tagged where JSON has no type: {"node": name}, {"tuple": [...]},
{"slice": [start, stop, step]}, {"dtype": "float32"}, {"device": "cpu"}, {"float": "inf"}.

No weights are stored here (they travel in the shards) and nothing is unpickled or executed:
`build` never generates source from the stored graph (torch.fx's codegen would), it validates
each node and returns a StoredModel that interprets them. A node may only call torch functions
that take tensors (torch.overrides' list), torchvision's ops, a few tensor creation functions,
tensor methods on tensors and arithmetic operators, and every name (node, input, keyword,
module path) must be an identifier or a dotted path of them, so a crafted plan cannot reach
files, processes or imports. `build` under `torch.device("meta")` allocates nothing.
"""
from __future__ import annotations

import builtins
import copy
import inspect
import keyword
import math
import operator
import os
import re
import traceback
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from robustdice.partitioner.errors import ModelError, PlanError
from robustdice.partitioner.zoo.compat import import_torchvision

FORMAT = "robustdice-fx-graph"
VERSION = 1

# Tensor creation functions take no tensor, so torch.overrides does not list them; these are
# the harmless ones a traced graph uses (torch.load, torch.from_file and the like are not).
_CREATION_FUNCTIONS = ("zeros", "ones", "full", "empty", "arange", "linspace", "eye")
_OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs",
              "invert", "and_", "or_", "xor", "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge",
              "getitem", "iadd", "isub", "imul", "itruediv", "ifloordiv")
# Tensor methods that leave torch (numpy, lists, storages) or take Python callables.
_DENIED_METHODS = frozenset({"grad_fn", "numpy", "tolist", "storage", "untyped_storage", "share_memory_", "pin_memory",
                             "register_hook", "register_post_accumulate_grad_hook", "backward",
                             "apply_", "map_", "map2_"})
# Containers are never fx leaves; DataParallel wraps devices, not layers.
_DENIED_MODULES = frozenset({"Module", "Sequential", "ModuleList", "ModuleDict", "ParameterList",
                             "ParameterDict", "Container", "DataParallel"})
_SKIPPED_ARGS = ("self", "device", "dtype")

_allowed_functions: Optional[Dict[str, Any]] = None


def _functions() -> Dict[str, Any]:
    """Public name → callable, for every function a stored graph may call."""
    global _allowed_functions
    if _allowed_functions is None:
        overridable = torch.overrides.get_overridable_functions()
        table: Dict[str, Any] = {}
        # Later namespaces do not override earlier ones: F.relu stays F's, torch.relu torch's.
        for prefix, namespace, sources in (("torch.nn.functional", F, (F,)),
                                           ("torch", torch, (torch, torch.functional))):
            allowed = {id(f) for s in sources for f in overridable.get(s, ())}
            for name in dir(namespace):
                fn = getattr(namespace, name, None)
                if not name.startswith("_") and id(fn) in allowed:
                    table.setdefault(f"{prefix}.{name}", fn)
        # torchvision is a dependency of this package on every board (JetPack ships one); its
        # ops (stochastic_depth, which fx keeps as a call) are tensor functions as well.
        ops = import_torchvision().ops
        for name in getattr(ops, "__all__", ()):
            fn = getattr(ops, name, None)
            if callable(fn) and not isinstance(fn, type):
                table[f"torchvision.ops.{name}"] = fn
        for name in _CREATION_FUNCTIONS:
            table[f"torch.{name}"] = getattr(torch, name)
        for name in _OPERATORS:
            table[f"operator.{name}"] = getattr(operator, name)
        table["builtins.getattr"] = builtins.getattr
        _allowed_functions = table
    return _allowed_functions


def _function_name(fn: Any) -> Optional[str]:
    name = getattr(fn, "__name__", None)
    for prefix in ("torch.nn.functional", "torch", "torchvision.ops", "operator", "builtins"):
        candidate = f"{prefix}.{name}"
        if _functions().get(candidate) is fn:
            return candidate
    return None


def _public_tensor_attribute(name: Any) -> bool:
    return (isinstance(name, str) and not name.startswith("_") and name not in _DENIED_METHODS
            and hasattr(torch.Tensor, name))


# --- tracing ------------------------------------------------------------------------------------

class _LayerTracer(fx.Tracer):
    """fx's default tracer, remembering which layer (module path) each node and failure is in."""

    def __init__(self) -> None:
        super().__init__()
        self._path: List[Tuple[str, str]] = []
        self.failed_in: Optional[Tuple[str, str]] = None

    def call_module(self, m, forward, args, kwargs):
        self._path.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost layer, before the stack unwinds
                self.failed_in = self._path[-1]
            raise
        finally:
            self._path.pop()

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["robustdice_layer"] = self._path[-1] if self._path else None
        return node


def _user_frame(exc: BaseException) -> str:
    """' at FILE:LINE: CODE' for the innermost frame outside torch (the operation that failed)."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno}: {(f.line or '').strip()}"


def trace(model: nn.Module, what: str) -> fx.GraphModule:
    """Symbolically trace `model`; a failure names the layer and the operation that stops it."""
    model = model.eval()
    tracer = _LayerTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds; the user needs the layer, the line, the reason
        path, cls = tracer.failed_in or ("", type(model).__name__)
        layer = f"layer '{path}' ({cls})" if path else f"the top-level forward ({cls})"
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelError(f"torch.fx cannot trace {what}: {layer}: {reason}{_user_frame(exc)}") from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__).eval()


# --- encoding -----------------------------------------------------------------------------------

def _where(node: fx.Node) -> str:
    layer = node.meta.get("robustdice_layer")
    return f"layer '{layer[0]}' ({layer[1]})" if layer and layer[0] else f"node '{node.name}'"


def _encode_value(value: Any, where: str) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):  # torch.Size too
        return {"tuple": [_encode_value(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode_value(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode_value(v, where) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode_value(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).replace("torch.", "")}
    raise ModelError(f"{where}: a value of type {type(value).__name__} ({value!r:.60}) cannot be stored in the plan")


def _module_args(module: nn.Module, path: str) -> Dict[str, Any]:
    """Constructor arguments that rebuild `module`, read from its attributes (torch.nn names them
    alike); checked by rebuilding it and comparing its repr and its tensors' shapes."""
    cls = type(module)
    where = f"layer '{path}' ({cls.__name__})"
    if getattr(nn, cls.__name__, None) is not cls or cls.__name__ in _DENIED_MODULES:
        raise ModelError(f"{where}: {cls.__module__}.{cls.__name__} is not one of torch.nn's own layers, "
                         f"so a board could not build it from torch alone")
    args: Dict[str, Any] = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in _SKIPPED_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name == "bias" and isinstance(p.default, bool):
            value = getattr(module, "bias", None) is not None
        elif hasattr(module, p.name) and not isinstance(getattr(module, p.name), torch.Tensor):
            value = getattr(module, p.name)
        elif p.default is not p.empty:
            continue
        else:
            raise ModelError(f"{where}: its constructor argument {p.name!r} is not an attribute, so it cannot be stored")
        if p.default is not p.empty and type(value) is type(p.default) and value == p.default:
            continue  # left out: an older torch without this argument still builds the layer
        args[p.name] = _encode_value(value, where)
    with torch.device("meta"):
        rebuilt = _construct(cls.__name__, args, where, ModelError)

    def shapes(m):
        return {k: (tuple(t.shape), t.dtype) for k, t in m.state_dict().items()}
    if repr(rebuilt) != repr(module) or shapes(rebuilt) != shapes(module):
        raise ModelError(f"{where}: rebuilt from its attributes it reads {repr(rebuilt)!r}, not {repr(module)!r}")
    return args


def encode(gm: nn.Module) -> Dict[str, Any]:
    """The JSON form of a traced model (see the module docstring); a StoredModel gives back the
    graph it was built from. Raises ModelError naming the layer of anything a board could not
    rebuild from torch alone."""
    if isinstance(gm, StoredModel):
        return copy.deepcopy(gm._data)
    modules: Dict[str, Any] = {}
    tensors: Dict[str, Any] = {}
    nodes: List[Dict[str, Any]] = []
    params = dict(gm.named_parameters())
    buffers = dict(gm.named_buffers())
    for node in gm.graph.nodes:
        where = _where(node)
        target: Any = node.target
        if node.op == "call_module":
            if target not in modules:
                modules[target] = {"class": type(gm.get_submodule(target)).__name__,
                                   "args": _module_args(gm.get_submodule(target), target)}
        elif node.op == "get_attr":
            if target not in params and target not in buffers:
                raise ModelError(f"{where}: reads {target!r}, which is not a tensor")
            t = params.get(target, buffers.get(target))
            tensors[target] = {"kind": "parameter" if target in params else "buffer",
                               "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        elif node.op == "call_function":
            target = _function_name(node.target)
            if target is None:
                name = getattr(node.target, "__qualname__", repr(node.target))
                raise ModelError(f"{where}: calls {getattr(node.target, '__module__', '?')}.{name}, which is not a "
                                 f"torch function a board can run without the model's code (a function "
                                 f"wrapped with torch.fx.wrap? let it be traced through instead)")
        elif node.op == "call_method" and not _public_tensor_attribute(target):
            raise ModelError(f"{where}: calls method {target!r}, which is not a tensor method a board may run")
        entry: Dict[str, Any] = {"name": node.name, "op": node.op, "target": target}
        if node.args:
            entry["args"] = [_encode_value(a, where) for a in node.args]
        if node.kwargs:
            entry["kwargs"] = {k: _encode_value(v, where) for k, v in node.kwargs.items()}
        nodes.append(entry)
    return {"format": FORMAT, "version": VERSION, "name": type(gm).__name__, "modules": modules,
            "tensors": tensors, "nodes": nodes}


# --- building -----------------------------------------------------------------------------------
# A stored graph is never turned into Python source: `build` validates every node against the
# closed vocabulary above and returns a StoredModel whose forward *interprets* the validated
# steps. Every name is checked as well (identifiers and dotted module paths), so that the graph
# torch.fx traces from a StoredModel (core/stages.py) holds no string that came from the file unchecked.

_PATH_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


def _identifier(value: Any) -> bool:
    return isinstance(value, str) and value.isidentifier() and not keyword.iskeyword(value)


def _module_path(value: Any) -> bool:
    """A dotted module path as torch.fx names it (`features.0.conv`): identifiers and indices."""
    return isinstance(value, str) and all(_PATH_PART.fullmatch(p) for p in value.split(".")) \
        and not keyword.iskeyword(value.split(".")[-1])


@dataclass(frozen=True)
class _Ref:
    """An argument that is the value of an earlier node."""

    name: str


@dataclass(frozen=True)
class _Step:
    name: str
    op: str        # placeholder | call_function | call_method | call_module | get_attr | output
    target: Any    # the function itself; a method name; a module or tensor path
    args: tuple
    kwargs: Dict[str, Any]


def _resolve(value: Any, env: Mapping[str, Any]) -> Any:
    if isinstance(value, _Ref):
        return env[value.name]
    if isinstance(value, list):
        return [_resolve(v, env) for v in value]
    if isinstance(value, tuple):
        return tuple(_resolve(v, env) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, env) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_resolve(value.start, env), _resolve(value.stop, env), _resolve(value.step, env))
    return value


def _tensor_like(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, fx.Proxy))


class StoredModel(nn.Module):
    """A model built from a plan's stored graph: torch.nn layers, tensors and validated steps.

    `forward` walks the steps, calling only the functions, tensor methods and layers that
    `build` looked up in the allowlists; no code is generated or executed from the plan. torch.fx
    traces it like any model (each layer is a leaf), which is how core/stages.py cuts it.
    """

    def __init__(self, name: str, steps: List[_Step], data: Mapping[str, Any]) -> None:
        super().__init__()
        self.model_name = name
        self._steps = tuple(steps)
        self._data = copy.deepcopy(dict(data))  # what `encode` gives back: the plan's graph itself

    def _fetch(self, path: str) -> Any:
        obj: Any = self
        for part in path.split("."):
            obj = getattr(obj, part)  # nn.Module.__getattr__: torch.fx sees parameters and buffers
        return obj

    def forward(self, x):
        env: Dict[str, Any] = {}
        for step in self._steps:
            args = _resolve(step.args, env)
            kwargs = _resolve(step.kwargs, env)
            if step.op == "placeholder":
                value = x
            elif step.op == "output":
                return args[0]
            elif step.op == "call_module":
                value = self._fetch(step.target)(*args, **kwargs)
            elif step.op == "get_attr":
                value = self._fetch(step.target)
            elif step.op == "call_method":
                if not args or not _tensor_like(args[0]):
                    raise PlanError(f"node '{step.name}': method {step.target!r} called on a "
                                    f"{type(args[0]).__name__ if args else 'missing'} value, not a tensor")
                value = getattr(args[0], step.target)(*args[1:], **kwargs)
            else:  # call_function
                if step.target is builtins.getattr and not _tensor_like(args[0]):
                    raise PlanError(f"node '{step.name}': getattr of a {type(args[0]).__name__}, not a tensor")
                value = step.target(*args, **kwargs)
            env[step.name] = value
        raise PlanError("the stored graph has no output node")


def _decode_value(value: Any, where: str, env: Mapping[str, Any]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode_value(v, where, env) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        (tag, body), = value.items()
        if tag == "node" and isinstance(body, str) and body in env:
            return env[body]
        if tag == "tuple" and isinstance(body, list):
            return tuple(_decode_value(v, where, env) for v in body)
        if tag == "dict" and isinstance(body, dict):
            bad = next((k for k in body if not _identifier(k)), None)
            if bad is not None:
                raise PlanError(f"{where}: key {bad!r:.80} is not a Python identifier")
            return {k: _decode_value(v, f"{where}.{k}", env) for k, v in body.items()}
        if tag == "slice" and isinstance(body, list) and len(body) == 3:
            return slice(*(_decode_value(v, where, env) for v in body))
        if tag == "ellipsis" and body is True:
            return Ellipsis
        if tag == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        if tag in ("dtype", "memory_format") and isinstance(body, str):
            found = getattr(torch, body, None)
            if isinstance(found, torch.dtype if tag == "dtype" else torch.memory_format):
                return found
        if tag == "device" and isinstance(body, str):
            try:
                return torch.device(body)
            except RuntimeError:
                pass
    raise PlanError(f"{where}: {value!r:.80} is not a value this build can read")


def _construct(class_name: str, args: Any, where: str, error=PlanError) -> nn.Module:
    cls = getattr(nn, class_name, None) if isinstance(class_name, str) else None
    if (not isinstance(cls, type) or not issubclass(cls, nn.Module) or class_name.startswith("_")
            or class_name in _DENIED_MODULES):
        raise error(f"{where}.class: {class_name!r} is not a torch.nn layer")
    if not isinstance(args, dict):
        raise error(f"{where}.args: {args!r:.80} is not an object")
    kwargs = _decode_value({"dict": args}, f"{where}.args", {})
    try:
        return cls(**kwargs)
    except Exception as exc:  # an argument this torch does not take, or a bad value
        raise error(f"{where}: torch {torch.__version__} cannot build {class_name}(**{kwargs}): "
                    f"{type(exc).__name__}: {exc}") from None


def _install(root: nn.Module, path: Any, where: str) -> Tuple[nn.Module, str]:
    """The parent module of dotted `path` (created as plain containers) and the last name."""
    if not _module_path(path):
        raise PlanError(f"{where}: {path!r:.80} is not a module path (dotted identifiers)")
    *parents, last = path.split(".")
    owner = root
    for name in parents:
        child = owner._modules.get(name)
        if child is None:
            if hasattr(owner, name):
                raise PlanError(f"{where}: {path!r} is not a module path")
            child = nn.Module()
            owner.add_module(name, child)
        owner = child
    if hasattr(owner, last):
        raise PlanError(f"{where}: {path!r} is not a new module path")
    return owner, last


def build(data: Any, where: str = "architecture") -> StoredModel:
    """A StoredModel from `encode`'s JSON (on torch's current default device, uninitialised
    where weights will be loaded). Raises PlanError naming the field of anything malformed;
    nothing read from `data` is executed."""
    if not isinstance(data, dict):
        raise PlanError(f"plan field {where}: expected an object")
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise PlanError(f"plan field {where}: format {data.get('format')!r} version {data.get('version')!r} "
                        f"is not {FORMAT!r} version {VERSION}")
    modules, tensors, nodes = data.get("modules"), data.get("tensors"), data.get("nodes")
    for key, value, kind in (("modules", modules, dict), ("tensors", tensors, dict), ("nodes", nodes, list)):
        if not isinstance(value, kind):
            raise PlanError(f"plan field {where}.{key}: expected {'an object' if kind is dict else 'a list'}")
    name = data.get("name", "StoredModel")  # the user's class name, for messages
    if not _identifier(name):
        raise PlanError(f"plan field {where}.name: {name!r:.80} is not a class name")
    steps: List[_Step] = []
    env: Dict[str, _Ref] = {}
    for i, entry in enumerate(nodes):
        step = _build_step(entry, f"plan field {where}.nodes[{i}]", env, modules, tensors)
        env[step.name] = _Ref(step.name)
        steps.append(step)
    ops = [s.op for s in steps]
    if ops.count("placeholder") != 1 or ops.count("output") != 1 or ops[-1] != "output":
        raise PlanError(f"plan field {where}.nodes: expected one input (placeholder) and one output node, "
                        f"the output last; found {ops.count('placeholder')} and {ops.count('output')}")
    model = StoredModel(name, steps, data)
    for path, spec in modules.items():
        w = f"plan field {where}.modules.{path}"
        if not isinstance(spec, dict):
            raise PlanError(f"{w}: expected an object")
        owner, last = _install(model, path, w)
        owner.add_module(last, _construct(spec.get("class"), spec.get("args", {}), w))
    for path, spec in tensors.items():
        w = f"plan field {where}.tensors.{path}"
        if not isinstance(spec, dict):
            raise PlanError(f"{w}: expected an object")
        shape, dtype, kind = spec.get("shape"), getattr(torch, str(spec.get("dtype")), None), spec.get("kind")
        if not isinstance(shape, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape):
            raise PlanError(f"{w}.shape: {shape!r} is not a list of sizes")
        if not isinstance(dtype, torch.dtype):
            raise PlanError(f"{w}.dtype: {spec.get('dtype')!r} is not a torch dtype")
        owner, last = _install(model, path, w)
        t = torch.empty(shape, dtype=dtype)
        if kind == "parameter":
            owner.register_parameter(last, nn.Parameter(t, requires_grad=False))
        elif kind == "buffer":
            owner.register_buffer(last, t)
        else:
            raise PlanError(f"{w}.kind: {kind!r} is not parameter or buffer")
    return model.eval()


def _build_step(entry: Any, w: str, env: Mapping[str, _Ref], modules: Mapping[str, Any],
                tensors: Mapping[str, Any]) -> _Step:
    if not isinstance(entry, dict) or not _identifier(entry.get("name")) or entry["name"] in env:
        raise PlanError(f"{w}.name: {entry.get('name') if isinstance(entry, dict) else entry!r:.80} "
                        f"is not a new Python identifier")
    op, target = entry.get("op"), entry.get("target")
    args = _decode_value(entry.get("args", []), f"{w}.args", env)
    kwargs = _decode_value({"dict": entry.get("kwargs", {})}, f"{w}.kwargs", env)
    if not isinstance(args, list):
        raise PlanError(f"{w}.args: expected a list")
    if op == "call_function":
        fn = _functions().get(target) if isinstance(target, str) else None
        if fn is None:
            raise PlanError(f"{w}.target: {target!r:.80} is not a torch function a plan may call")
        if fn is builtins.getattr and not (len(args) == 2 and _public_tensor_attribute(args[1])):
            raise PlanError(f"{w}.args: getattr of {args[1:]!r:.60} is not a tensor attribute")
        target = fn
    elif op == "call_method":
        if not _public_tensor_attribute(target):
            raise PlanError(f"{w}.target: {target!r:.80} is not a tensor method a plan may call")
    elif op == "call_module":
        if target not in modules:
            raise PlanError(f"{w}.target: {target!r:.80} is not in the architecture's modules")
    elif op == "get_attr":
        if target not in tensors:
            raise PlanError(f"{w}.target: {target!r:.80} is not in the architecture's tensors")
    elif op == "placeholder":
        # A placeholder's args are its default value: the model takes its one input, nothing else.
        if not _identifier(target) or args or kwargs:
            raise PlanError(f"{w}.target: {target!r:.80} is not an input name (an identifier, no default)")
    elif op == "output":
        if len(args) != 1 or kwargs:
            raise PlanError(f"{w}.args: an output node returns one value")
    else:
        raise PlanError(f"{w}.op: {op!r:.80} is not a torch.fx operation")
    return _Step(entry["name"], op, target, tuple(args), kwargs)
