"""Stages: the model graph cut at every neuron-producing layer.

A *stage* is one Conv2d (depthwise and grouped too) or Linear layer — its output channels are the
neurons that a plan distributes — plus the channel-local operations that directly follow it
(BatchNorm, ReLU/GELU, pooling, dropout): those can run on a device's slice of channels before
the gather. Everything else (LayerNorm over channels, residual adds, flatten, permutes,
softmax) runs on the full tensor on every device.

`trace_stages(model)` traces the model with torch.fx and replaces each stage's chain of nodes by
one `StageCall` node. The remaining graph (the *skeleton*) holds only parameters that every
device needs in full; the stages' own modules are kept aside in `Stage` objects. Running the
skeleton calls back into a `stage_fn(index, x) -> output`, which is where a simulation
computes and assembles every surviving device's slice, and where a node computes its own slice
and gathers the rest over the network.

Layers are named by their dotted module path as torch.fx gives it (`features.3`).
Channel ("neuron") axis: dim 1 for Conv2d outputs, the last dim for Linear outputs (ConvNeXt
applies Linear to channels-last tensors).

Slices are described by plain tensors (see `slice_params`) so that a shard holds exactly what a
device needs, and a device can run its slice from a model skeleton built on the meta device.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from robustdice.partitioner.errors import ModelError

# Neuron-producing layer classes → stage kind. A test asserts every class here slices exactly.
STAGE_MODULES: Dict[type, str] = {
    nn.Conv2d: "conv",
    nn.Linear: "linear",
}

# Channel-local follower modules → (behaviour, stage kinds it may follow).
#   "batchnorm": per-channel affine with running stats; its parameters are sliced with the neurons.
#   "pointwise": elementwise, parameterless (in eval mode dropout is the identity).
#   "spatial":   acts per channel over H, W (pooling): only after a conv, whose channel dim is 1.
#   "depthwise": a depthwise Conv2d (groups = in = out channels): output channel c reads input
#                channel c only, so the device that holds neuron c of the stage computes it too,
#                with no gather between (see `_classify_follower`; its filters are sliced like a
#                BatchNorm's parameters). EfficientNet-Lite0's expand → depthwise pairs become one
#                stage: 34 gathers per frame instead of 50.
FOLLOWER_MODULES: Dict[type, Tuple[str, frozenset]] = {
    nn.BatchNorm2d: ("batchnorm", frozenset({"conv"})),
    nn.BatchNorm1d: ("batchnorm", frozenset({"linear"})),
    nn.ReLU: ("pointwise", frozenset({"conv", "linear"})),
    nn.ReLU6: ("pointwise", frozenset({"conv", "linear"})),
    nn.GELU: ("pointwise", frozenset({"conv", "linear"})),
    nn.SiLU: ("pointwise", frozenset({"conv", "linear"})),
    nn.Hardswish: ("pointwise", frozenset({"conv", "linear"})),
    nn.LeakyReLU: ("pointwise", frozenset({"conv", "linear"})),
    nn.Sigmoid: ("pointwise", frozenset({"conv", "linear"})),
    nn.Tanh: ("pointwise", frozenset({"conv", "linear"})),
    nn.Dropout: ("pointwise", frozenset({"conv", "linear"})),
    nn.Dropout2d: ("pointwise", frozenset({"conv"})),
    nn.Identity: ("pointwise", frozenset({"conv", "linear"})),
    nn.MaxPool2d: ("spatial", frozenset({"conv"})),
    nn.AvgPool2d: ("spatial", frozenset({"conv"})),
    nn.AdaptiveAvgPool2d: ("spatial", frozenset({"conv"})),
    nn.AdaptiveMaxPool2d: ("spatial", frozenset({"conv"})),
}

# The same for call_function / call_method nodes (the tensor is the first argument).
FOLLOWER_FUNCTIONS: Dict[Any, Tuple[str, frozenset]] = {
    F.relu: ("pointwise", frozenset({"conv", "linear"})),
    torch.relu: ("pointwise", frozenset({"conv", "linear"})),
    F.relu6: ("pointwise", frozenset({"conv", "linear"})),
    F.gelu: ("pointwise", frozenset({"conv", "linear"})),
    F.silu: ("pointwise", frozenset({"conv", "linear"})),
    F.hardswish: ("pointwise", frozenset({"conv", "linear"})),
    torch.sigmoid: ("pointwise", frozenset({"conv", "linear"})),
    F.dropout: ("pointwise", frozenset({"conv", "linear"})),
    F.max_pool2d: ("spatial", frozenset({"conv"})),
    F.avg_pool2d: ("spatial", frozenset({"conv"})),
    F.adaptive_avg_pool2d: ("spatial", frozenset({"conv"})),
}
FOLLOWER_METHODS: Dict[str, Tuple[str, frozenset]] = {
    "relu": ("pointwise", frozenset({"conv", "linear"})),
    "sigmoid": ("pointwise", frozenset({"conv", "linear"})),
}

# Modules with parameters that run on the full tensor on every device (their parameters go
# into every shard). Any other module with parameters is refused, naming the layer.
FULL_TENSOR_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)

BN_KEYS = ("weight", "bias", "running_mean", "running_var")
DEPTHWISE_KEYS = ("weight", "bias")


@dataclass
class Follower:
    """One channel-local operation applied to a stage's output (sliced or full)."""

    name: str            # module path, or the function's name for call_function nodes
    behaviour: str       # "batchnorm" | "pointwise" | "spatial"
    fn: Callable         # the module, or the function; called as fn(x, *args, **kwargs)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class Stage:
    index: int
    name: str                 # dotted module path of the Conv2d / Linear
    kind: str                 # "conv" | "linear"
    module: nn.Module         # the Conv2d / Linear (may live on the meta device)
    followers: List[Follower]

    @property
    def n_neurons(self) -> int:
        return self.module.out_channels if self.kind == "conv" else self.module.out_features

    @property
    def channel_dim(self) -> int:
        return 1 if self.kind == "conv" else -1

    @property
    def follower_names(self) -> List[str]:
        return [f.name for f in self.followers]


class _Dispatch(threading.local):
    """Shared by every StageCall of one skeleton: where stage outputs come from during a run.

    Thread-local, because a node's engine runs several frames at once on one skeleton.
    """

    fn: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None


class StageCall(nn.Module):
    """Stands in the skeleton graph for a whole stage (layer + followers)."""

    def __init__(self, index: int, name: str, dispatch: _Dispatch) -> None:
        super().__init__()
        self.index = index
        self.stage_name = name
        self._dispatch = dispatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        fn = self._dispatch.fn
        if fn is None:
            raise RuntimeError("StageCall run outside StagedModel.run")
        return fn(self.index, x)


class StagedModel:
    """A skeleton GraphModule plus the stages cut out of it."""

    def __init__(self, skeleton: fx.GraphModule, stages: List[Stage], dispatch: _Dispatch) -> None:
        self.skeleton = skeleton
        self.stages = stages
        self._dispatch = dispatch
        # For `steps`: the modules by target, and for each node the values it reads last.
        self._modules = dict(skeleton.named_modules())
        self._last_uses: Dict[fx.Node, List[fx.Node]] = {}
        seen = set()
        for node in reversed(list(skeleton.graph.nodes)):
            for used in node.all_input_nodes:
                if used not in seen:
                    seen.add(used)
                    self._last_uses.setdefault(node, []).append(used)

    def run(self, x: torch.Tensor, stage_fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Run the model; every stage's output comes from `stage_fn(index, stage_input)`."""
        self._dispatch.fn = stage_fn
        try:
            return self.skeleton(x)
        finally:
            self._dispatch.fn = None

    def steps(self, x: torch.Tensor) -> Generator[Tuple[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Run the model one stage at a time: yields (stage index, stage input), takes the
        stage's output by `send`, and returns the model output (StopIteration.value).

        The same graph as `run`, interpreted node by node, so that a caller can suspend a frame
        at every stage without holding a thread (the node's dataflow engine keeps many frames
        suspended at once). Values are freed after their last use, as torch.fx's Interpreter
        does, so a suspended frame holds only what later nodes still read.
        """
        env: Dict[fx.Node, Any] = {}
        modules = self._modules
        load = env.__getitem__
        for node in self.skeleton.graph.nodes:
            op = node.op
            if op == "placeholder":
                value = x
            elif op == "output":
                return fx.node.map_arg(node.args[0], load)
            else:
                args = fx.node.map_arg(node.args, load)
                kwargs = fx.node.map_arg(node.kwargs, load)
                if op == "call_module":
                    mod = modules[node.target]
                    if isinstance(mod, StageCall):
                        value = yield mod.index, args[0]
                    else:
                        value = mod(*args, **kwargs)
                elif op == "call_function":
                    value = node.target(*args, **kwargs)
                elif op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:  # get_attr
                    value = self._attr(node.target)
            env[node] = value
            for dead in self._last_uses.get(node, ()):
                del env[dead]
        raise RuntimeError("the skeleton graph has no output node")

    def _attr(self, target: str) -> Any:
        obj: Any = self.skeleton
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def run_full(self, x: torch.Tensor) -> torch.Tensor:
        """The plain model: every stage computed whole from its own modules."""
        return self.run(x, lambda i, t: full_stage_output(self.stages[i], t))

    def shared_state(self) -> Dict[str, torch.Tensor]:
        """Parameters and buffers every device needs in full (everything outside the stages)."""
        return dict(self.skeleton.state_dict())

    def stage_by_name(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def _classify_follower(node: fx.Node, modules: Mapping[str, nn.Module], kind: str) -> Optional[Follower]:
    """A Follower if `node` is a channel-local op acting on its first argument only, else None."""
    if not node.args or any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return None
    if node.op == "call_module":
        mod = modules[node.target]
        if kind == "conv" and is_depthwise(mod):
            return Follower(str(node.target), "depthwise", mod)
        entry = FOLLOWER_MODULES.get(type(mod))
        if entry is None or kind not in entry[1]:
            return None
        if entry[0] == "batchnorm" and not (mod.track_running_stats and mod.affine):
            return None
        return Follower(str(node.target), entry[0], mod)
    if node.op == "call_function":
        entry = FOLLOWER_FUNCTIONS.get(node.target)
        if entry is None or kind not in entry[1]:
            return None
        return Follower(getattr(node.target, "__name__", str(node.target)), entry[0], node.target,
                        tuple(node.args[1:]), dict(node.kwargs))
    if node.op == "call_method":
        entry = FOLLOWER_METHODS.get(str(node.target))
        if entry is None or kind not in entry[1]:
            return None
        method = str(node.target)
        return Follower(method, entry[0], lambda t, *a, _m=method, **k: getattr(t, _m)(*a, **k),
                        tuple(node.args[1:]), dict(node.kwargs))
    return None


def is_depthwise(mod: nn.Module) -> bool:
    """A Conv2d whose every output channel reads only the input channel of the same index."""
    return (type(mod) is nn.Conv2d and mod.groups == mod.in_channels == mod.out_channels
            and mod.padding_mode == "zeros")


def trace_stages(model: nn.Module) -> StagedModel:
    """Cut `model` into stages. Raises ModelError naming the layer it cannot handle."""
    model = model.eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many kinds; the user needs the model name and reason
        raise ModelError(f"torch.fx cannot trace {type(model).__name__}: {exc}") from exc
    modules = dict(gm.named_modules())
    graph = gm.graph
    dispatch = _Dispatch()
    stages: List[Stage] = []

    fused = set()   # nodes already taken into an earlier stage (depthwise followers)
    for node in list(graph.nodes):
        if node.op != "call_module" or node in fused:
            continue
        mod = modules[node.target]
        kind = STAGE_MODULES.get(type(mod))
        if kind is None:
            has_params = any(True for _ in mod.parameters(recurse=False))
            if has_params and not isinstance(mod, FULL_TENSOR_MODULES):
                raise ModelError(f"layer '{node.target}' ({type(mod).__name__}) is not supported: "
                                 f"only Conv2d and Linear are split; "
                                 f"{', '.join(c.__name__ for c in FULL_TENSOR_MODULES)} run whole")
            continue
        if kind == "conv" and (mod.padding_mode != "zeros" or mod.in_channels % mod.groups):
            raise ModelError(f"layer '{node.target}' (Conv2d) uses padding_mode={mod.padding_mode!r}; "
                             f"only zero padding is supported")
        chain = [node]
        followers: List[Follower] = []
        while len(chain[-1].users) == 1:
            nxt = next(iter(chain[-1].users))
            if nxt.args[0] is not chain[-1]:
                break
            f = _classify_follower(nxt, modules, kind)
            if f is None:
                break
            followers.append(f)
            chain.append(nxt)
            fused.add(nxt)
        index = len(stages)
        call_name = f"_stage_{index}"
        gm.add_submodule(call_name, StageCall(index, str(node.target), dispatch))
        with graph.inserting_after(chain[-1]):
            call = graph.call_module(call_name, (node.args[0],))
        chain[-1].replace_all_uses_with(call)
        for n in reversed(chain):
            graph.erase_node(n)
        stages.append(Stage(index, str(node.target), kind, mod, followers))

    if not stages:
        raise ModelError(f"{type(model).__name__} has no Conv2d or Linear layer to split")
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return StagedModel(gm, stages, dispatch)


# --- slicing -------------------------------------------------------------------------------
# A slice of a stage's linear part is described by tensors only:
#   weight (k, cin_per_group, kh, kw) or (k, in_features); bias (k) optional;
#   for grouped convolutions, input_index (k * cin_per_group,) picks each output channel's own
#   input channels and the slice runs with groups = k; for groups == 1 the whole input is used.
# The cdc parity rows use the same description (see `parity_params`).


def _conv_input_index(mod: nn.Conv2d, neurons: torch.Tensor) -> torch.Tensor:
    cin_per = mod.in_channels // mod.groups
    cout_per = mod.out_channels // mod.groups
    group = neurons // cout_per
    return (group[:, None] * cin_per + torch.arange(cin_per)[None, :]).reshape(-1)


def slice_params(stage: Stage, neurons: Sequence[int], with_followers: bool = True) -> Dict[str, torch.Tensor]:
    """The tensors a device needs to compute `neurons` of `stage` (copies, not views)."""
    idx = torch.as_tensor(list(neurons), dtype=torch.long)
    mod = stage.module
    out: Dict[str, torch.Tensor] = {"weight": mod.weight.detach()[idx].clone()}
    if mod.bias is not None:
        out["bias"] = mod.bias.detach()[idx].clone()
    if stage.kind == "conv" and mod.groups > 1:
        out["input_index"] = _conv_input_index(mod, idx)
    if with_followers:
        out.update(follower_params(stage, idx))
    return out


def follower_params(stage: Stage, idx: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """BatchNorm and depthwise followers' tensors, sliced to `idx` (None: all channels)."""
    out: Dict[str, torch.Tensor] = {}
    for j, f in enumerate(stage.followers):
        keys = BN_KEYS if f.behaviour == "batchnorm" else DEPTHWISE_KEYS if f.behaviour == "depthwise" else ()
        for key in keys:
            t = getattr(f.fn, key)
            if t is None:  # a depthwise conv without bias
                continue
            t = t.detach()
            out[f"f{j}.{key}"] = (t if idx is None else t[idx]).clone()
    return out


def parity_params(stage: Stage, members: Sequence[Sequence[int]]) -> Dict[str, torch.Tensor]:
    """The cdc parity rows: row j computes sum over `members[j]` of those neurons' outputs.

    Only the linear part is summed (CDC paper Eq. 1–2). For groups == 1 the row is the column
    sum of the weight matrix; for grouped/depthwise convolutions the members read different
    input channels, so the row becomes one group of a grouped convolution over the members'
    own input channels (padded with zero weights to the longest row).
    """
    mod = stage.module
    w = mod.weight.detach()
    rows = len(members)
    width = max((len(m) for m in members), default=1) or 1
    if stage.kind == "linear" or mod.groups == 1:
        weight = torch.zeros((rows,) + tuple(w.shape[1:]), dtype=w.dtype)
        for j, m in enumerate(members):
            if m:
                weight[j] = w[torch.as_tensor(m)].sum(0)
        out = {"weight": weight}
    else:
        cin_per = mod.in_channels // mod.groups
        weight = torch.zeros((rows, width * cin_per) + tuple(w.shape[2:]), dtype=w.dtype)
        input_index = torch.zeros(rows * width * cin_per, dtype=torch.long)
        for j, m in enumerate(members):
            if not m:
                continue
            mi = torch.as_tensor(m)
            weight[j, : len(m) * cin_per] = w[mi].reshape(len(m) * cin_per, *w.shape[2:])
            input_index[j * width * cin_per: (j * width + len(m)) * cin_per] = _conv_input_index(mod, mi)
        out = {"weight": weight, "input_index": input_index}
    if mod.bias is not None:
        b = mod.bias.detach()
        out["bias"] = torch.stack([b[torch.as_tensor(m)].sum() if m else b.new_zeros(()) for m in members]) \
            if rows else b.new_zeros(0)
    return out


def compute_linear(stage: Stage, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The stage's linear part over the slice described by `params` (channel dim as the stage's)."""
    weight = params["weight"]
    bias = params.get("bias")
    mod = stage.module
    if stage.kind == "linear":
        return F.linear(x, weight, bias)
    k = weight.shape[0]
    if k == 0:  # a device may hold no neuron of a layer; keep the shape consistent
        h, w = _conv_out_hw(mod, x.shape[-2:])
        return x.new_zeros((x.shape[0], 0, h, w))
    groups = 1
    if "input_index" in params:
        x = x.index_select(1, params["input_index"])
        groups = k
    return F.conv2d(x, weight, bias, mod.stride, mod.padding, mod.dilation, groups)


def _conv_out_hw(mod: nn.Conv2d, hw) -> Tuple[int, int]:
    out = []
    for i, size in enumerate(hw):
        k = mod.kernel_size[i]
        out.append((size + 2 * mod.padding[i] - mod.dilation[i] * (k - 1) - 1) // mod.stride[i] + 1)
    return out[0], out[1]


def apply_followers(stage: Stage, params: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Run the stage's channel-local followers on `y` (a slice or the full output)."""
    for j, f in enumerate(stage.followers):
        if f.behaviour == "batchnorm":
            if y.shape[1] == 0:
                continue
            y = F.batch_norm(y, params[f"f{j}.running_mean"], params[f"f{j}.running_var"],
                             params[f"f{j}.weight"], params[f"f{j}.bias"], False, 0.0, f.fn.eps)
        elif f.behaviour == "depthwise":
            mod = f.fn
            if y.shape[1] == 0:
                h, w = _conv_out_hw(mod, y.shape[-2:])
                y = y.new_zeros((y.shape[0], 0, h, w))
                continue
            y = F.conv2d(y, params[f"f{j}.weight"], params.get(f"f{j}.bias"), mod.stride, mod.padding,
                         mod.dilation, y.shape[1])
        elif y.shape[stage.channel_dim] == 0 and f.behaviour == "spatial":
            # pooling an empty channel set: compute the output size on a 1-channel stand-in
            shape = f.fn(y.new_zeros(y.shape[:1] + (1,) + y.shape[2:]), *f.args, **f.kwargs).shape
            y = y.new_zeros((shape[0], 0) + tuple(shape[2:]))
        else:
            y = f.fn(y, *f.args, **f.kwargs)
    return y


def full_stage_output(stage: Stage, x: torch.Tensor) -> torch.Tensor:
    """The stage computed whole from its own modules — the reference for equivalence."""
    y = stage.module(x)
    for f in stage.followers:
        y = f.fn(y, *f.args, **f.kwargs)
    return y


def to_neuron_major(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Move the neuron axis first (a view), the layout of slices on the wire."""
    return t.movedim(channel_dim, 0)


def from_neuron_major(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    return t.movedim(0, channel_dim)


def param_bytes(tensors: Mapping[str, Any]) -> int:
    """Bytes of every tensor in a (possibly nested) mapping."""
    total = 0
    for v in tensors.values():
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, Mapping):
            total += param_bytes(v)
    return total


__all__ = [
    "STAGE_MODULES", "FOLLOWER_MODULES", "FOLLOWER_FUNCTIONS", "FULL_TENSOR_MODULES",
    "Stage", "Follower", "StagedModel", "StageCall", "trace_stages",
    "slice_params", "follower_params", "parity_params", "compute_linear", "apply_followers",
    "full_stage_output", "to_neuron_major", "from_neuron_major", "param_bytes",
]
