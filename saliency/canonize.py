"""How LRP sees a model (SPEC §1.3): one canonizer for any torch.fx-traceable CNN, chosen from its graph,
never from its class.

``canonize`` traces a private copy (``torch.fx.symbolic_trace``) and rewrites its graph:
- every module called more than once gets one copy per call site (zennit keeps one state per module);
- every BatchNorm whose input is one Linear/Conv's output, used by nothing else, is merged into it
  (zennit's ``MergeBatchNorm.merge_batch_norm``);
- every sum of two tensors (``a + b``, ``torch.add``, ``out += identity``, ``Tensor.add(_)``, also after
  a padded option-A shortcut) becomes zennit's ``Sum`` over ``torch.stack([a, b], -1)``, as zennit's
  ResNetCanonizer does, so LRP's rule for sums splits relevance between the branches in proportion to
  their contributions instead of copying it to both (the plain gradient of ``+``);
- ``torch.cat`` (DenseNet) is left as it is: its gradient hands each part its own relevance.

Every other node must be one LRP covers; the rest is refused in one ValueError naming the graph nodes,
before any relevance is computed. Covered, with why relevance is conserved on a bias-free copy:
- Conv, Linear (the composite's rule), AvgPool / AdaptiveAvgPool modules and the sums (zennit's Norm);
- a BatchNorm that cannot be merged (DenseNet's, after a concatenation) becomes the per-channel affine
  layer it computes (``Affine``) and gets the ε rule; without running mean and β it is a per-channel
  scale and passes its relevance on whole;
- ReLU and ReLU6 (Hardtanh from 0): zennit passes relevance through an activation unchanged, attributing
  it to the neuron's pre-activation. ReLU6 is covered because, like ReLU, it keeps every activation
  ≥ 0 — what z⁺ and α-β (deep Taylor decomposition with root points in the positive orthant) assume —
  and is piecewise linear; GELU, SiLU, Hardswish, sigmoid … give negative or smooth outputs no rule here
  is derived for, and are refused;
- routing ops whose gradient moves each value to one place, sums copies or averages (max pools, mean,
  functional average pools, flatten / view / reshape / permute, expand, chunk / split (ShuffleNet),
  getitem, constant zero padding, dropout, identity): their gradient keeps the sum of relevance;
- arithmetic on shapes (``x.size(0)``, ``x.shape``), which carries no relevance.
"""
from __future__ import annotations

import collections
import copy
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

#: Modules LRP covers (a rule from the composite, or a gradient that keeps the sum of relevance).
COVERED_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.ReLU, nn.Hardtanh,  # Hardtanh only from 0 (ReLU6), checked below
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)
#: Functions and tensor methods whose gradient keeps the sum of relevance.
ROUTING_FUNCTIONS = {
    torch.flatten, torch.cat, torch.concat, torch.relu, F.relu, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.dropout,
    torch.mean, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, operator.getitem, F.pad,
    torch.chunk, torch.split,
}
ROUTING_METHODS = {"view", "reshape", "flatten", "mean", "relu", "relu_", "contiguous", "squeeze",
                   "unsqueeze", "permute", "transpose", "expand", "expand_as", "chunk", "split"}
_ADDS = {operator.add, operator.iadd, torch.add}
_IN_PLACE = {operator.iadd, "add_", "relu_"}


def canonize(model: nn.Module, x: Tensor) -> fx.GraphModule:
    """A private copy of ``model`` in eval mode as an fx GraphModule that zennit's rules explain (see the
    module docstring); ``x`` (one image of it is run) fixes which values are tensors. The model is left
    unchanged. Raises ValueError naming every node LRP does not cover."""
    clone = copy.deepcopy(model).eval()
    for module in clone.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    try:
        graph_module = fx.symbolic_trace(clone)
    except Exception as error:  # data-dependent control flow, unsupported Python
        with torch.no_grad():
            clone(x[:1].detach())  # a model that fails on its own raises its own error
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"LRP needs the model's graph, and torch.fx cannot trace {type(model).__name__} "
                         f"({type(error).__name__}: {first}); refused before any compute (SPEC §1.3)") from error
    with torch.no_grad():
        ShapeProp(graph_module).propagate(x[:1].detach())
    uncovered = [(node.name, _describe(graph_module, node)) for node in graph_module.graph.nodes
                 if not _covered(graph_module, node)]
    if uncovered:
        kinds = collections.Counter(what for _, what in uncovered)
        listed = "; ".join(f"node {name!r} ({what})" for name, what in uncovered[:8])
        listed += f"; … {len(uncovered) - 8} more" if len(uncovered) > 8 else ""
        raise ValueError(f"LRP cannot cover {type(model).__name__}: no rule conserves relevance at "
                         f"{len(uncovered)} graph node(s) ({', '.join(f'{k} ×{n}' for k, n in kinds.most_common())}"
                         f"): {listed}. Refused before any compute (SPEC §1.3)")
    _one_module_per_call(graph_module)
    _averages_as_modules(graph_module)
    _merge_batchnorms(graph_module)
    _explicit_sums(graph_module)
    _out_of_place(graph_module)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


# ------------------------------------------------------------------------------------------ coverage
def _is_tensor(value) -> bool:
    return isinstance(value, fx.Node) and isinstance(value.meta.get("tensor_meta"), TensorMetadata)


def _holds_tensors(meta) -> bool:
    if isinstance(meta, TensorMetadata):  # a NamedTuple itself
        return True
    if isinstance(meta, (tuple, list)):
        return any(_holds_tensors(m) for m in meta)
    if isinstance(meta, dict):
        return any(_holds_tensors(m) for m in meta.values())
    return False


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if _is_tensor(n) else None)
    return found


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target in ("add", "add_")))


def _is_tensor_sum(node: fx.Node) -> bool:
    """A sum of exactly two tensors, without torch.add's ``alpha``."""
    return (_is_add(node) and len(node.args) == 2 and all(_is_tensor(a) for a in node.args)
            and node.kwargs.get("alpha", 1) == 1 and not set(node.kwargs) - {"alpha"})


def _covered(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "get_attr":
        return not _is_tensor(node)
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if isinstance(module, nn.Hardtanh):
            return module.min_val == 0.0
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return module.running_mean is not None and module.running_var is not None
        return isinstance(module, COVERED_MODULES)
    if _is_add(node) and (_is_tensor(node) or _tensor_args(node)):
        return _is_tensor_sum(node)
    if node.target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        return mode == "constant" and not value
    if (node.op == "call_function" and node.target in ROUTING_FUNCTIONS) or (
            node.op == "call_method" and node.target in ROUTING_METHODS):
        return True
    # shape arithmetic (x.size(0), x.shape, n * c) and torch._assert: no tensor comes out, no relevance
    return not _holds_tensors(node.meta.get("tensor_meta")) or node.target is torch._assert


def _describe(graph_module: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        what = type(graph_module.get_submodule(node.target)).__name__
        if isinstance(graph_module.get_submodule(node.target), nn.Hardtanh):
            what += " (not from 0, unlike ReLU6)"
        elif isinstance(graph_module.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            what += " without running statistics (it normalises by the batch)"
    elif node.op == "get_attr":
        what = "a parameter or buffer used outside a layer"
    elif _is_add(node):
        what = f"{_name(node.target)} of a tensor and a constant (a bias no rule covers)"
    elif node.target is F.pad:
        what = "pad with a non-zero value or a non-constant mode"
    else:
        what = _name(node.target)
    return f"{node.op} {what}"


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


# ------------------------------------------------------------------------------------------ rewrites
class Mean(nn.Module):
    """``torch.mean`` as a module, so that LRP can give it zennit's Norm rule (relevance shared in
    proportion to the averaged values) instead of the gradient's equal shares."""

    def __init__(self, dim=None, keepdim: bool = False) -> None:
        super().__init__()
        self.dim, self.keepdim = dim, keepdim

    def forward(self, x: Tensor) -> Tensor:
        return x.mean() if self.dim is None else x.mean(self.dim, keepdim=self.keepdim)


_AVERAGE_MODULES = {F.adaptive_avg_pool1d: nn.AdaptiveAvgPool1d, F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
                    F.adaptive_avg_pool3d: nn.AdaptiveAvgPool3d, F.avg_pool1d: nn.AvgPool1d,
                    F.avg_pool2d: nn.AvgPool2d, F.avg_pool3d: nn.AvgPool3d}


def _averages_as_modules(graph_module: fx.GraphModule) -> None:
    """Functional average pools and means become modules that zennit's rules reach: the gradient of an
    average hands every input an equal share, also the inputs at zero, where a ReLU below then drops
    it (a densenet121 at 64² gave Σ R = 1.08 y_c that way); the Norm rule shares in proportion."""
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in _AVERAGE_MODULES:
            module = _AVERAGE_MODULES[node.target](*node.args[1:], **node.kwargs)
        elif (node.op == "call_function" and node.target is torch.mean) or (
                node.op == "call_method" and node.target == "mean"):
            if set(node.kwargs) - {"dim", "keepdim"} or len(node.args) > 3:
                continue  # dtype=…: left to the gradient, which still keeps the sum
            args = dict(zip(("dim", "keepdim"), node.args[1:]), **node.kwargs)
            module = Mean(args.get("dim"), bool(args.get("keepdim", False)))
        else:
            continue
        if not isinstance(module, nn.modules.pooling._AvgPoolNd) and (
                node.meta["tensor_meta"].shape == node.args[0].meta["tensor_meta"].shape):
            continue  # a mean or adaptive pool over one value each: the identity, nothing to share
        # (a padded k×k average pool with stride 1 keeps the shape too, and still averages: inception_v3's
        # F.avg_pool2d(x, 3, 1, 1) left to the gradient lost its padded shares, Σ R = 0.52 |y_c| under z⁺)
        name = f"{node.name}_module"
        graph_module.add_submodule(name, module)
        node.op, node.target, node.args, node.kwargs = "call_module", name, node.args[:1], {}


def _one_module_per_call(graph_module: fx.GraphModule) -> None:
    """A module called at several places gets a copy per extra call (same parameters, its own hooks)."""
    seen: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        count = seen[node.target] = seen.get(node.target, 0) + 1
        if count > 1:
            name = f"{node.target.replace('.', '_')}_call{count}"
            graph_module.add_submodule(name, copy.deepcopy(graph_module.get_submodule(node.target)))
            node.target = name


def _merge_batchnorms(graph_module: fx.GraphModule) -> None:
    """Fold each BatchNorm into the one Linear/Conv that alone feeds it, with zennit's MergeBatchNorm, and
    take the BatchNorm out of the graph: zennit leaves it in, computing x/√(1 + eps) — 0.9995 per layer at
    inception_v3's eps = 1e-3, which lost 1.4% of y_c over its depth; any other BatchNorm becomes the
    per-channel ``Affine`` layer it is in eval mode, for the composite's ε rule."""
    from zennit.canonizers import MergeBatchNorm

    for node in list(graph_module.graph.nodes):
        if node.op != "call_module":
            continue
        batch_norm = graph_module.get_submodule(node.target)
        if not isinstance(batch_norm, nn.modules.batchnorm._BatchNorm):
            continue
        source = node.args[0]
        if (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and isinstance(graph_module.get_submodule(source.target), (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))):
            MergeBatchNorm.merge_batch_norm([graph_module.get_submodule(source.target)], batch_norm)
            node.replace_all_uses_with(source)
            graph_module.graph.erase_node(node)
            continue
        name = f"{node.target.replace('.', '_')}_affine"
        graph_module.add_submodule(name, Affine(batch_norm))
        node.target = name


class Affine(nn.Module):
    """A BatchNorm in eval mode (running statistics) as the layer it computes, x · w + b per channel
    (channels at dim 1), with ``weight`` and ``bias`` for zennit's rules: w = γ/√(σ² + eps), b = β − μ·w."""

    def __init__(self, batch_norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        var, mean = batch_norm.running_var, batch_norm.running_mean
        scale = torch.rsqrt(var + batch_norm.eps)
        gamma = batch_norm.weight if batch_norm.weight is not None else torch.ones_like(var)
        beta = batch_norm.bias if batch_norm.bias is not None else torch.zeros_like(var)
        self.weight = nn.Parameter((gamma * scale).detach().clone())
        self.bias = nn.Parameter((beta - mean * gamma * scale).detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


def _explicit_sums(graph_module: fx.GraphModule) -> None:
    """Each sum of two tensors becomes zennit's ``Sum`` over the two stacked (broadcast) summands."""
    from zennit.layer import Sum

    graph = graph_module.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if not _is_tensor_sum(node):
            continue
        a, b = node.args
        with graph.inserting_before(node):
            pair = [a, b]
            if a.meta["tensor_meta"].shape != b.meta["tensor_meta"].shape:
                pair = graph.call_function(torch.broadcast_tensors, (a, b))
            stacked = graph.call_function(torch.stack, (pair, -1))
            name = f"{node.name}_sum"
            graph_module.add_submodule(name, Sum(dim=-1))
            summed = graph.call_module(name, (stacked,))
        summed.meta = dict(node.meta)
        if node.target in _IN_PLACE:  # later readers of the mutated summand read the sum
            for user in list(a.users):
                if order.get(user, -1) > order[node]:
                    user.replace_input_with(a, summed)
        node.replace_all_uses_with(summed)
        graph.erase_node(node)


def _out_of_place(graph_module: fx.GraphModule) -> None:
    """In-place ReLUs become out-of-place (zennit hooks the values they would overwrite); later readers
    of the overwritten tensor read the result."""
    graph = graph_module.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        in_place = node.kwargs.get("inplace") is True or node.target in _IN_PLACE
        if node.op not in ("call_function", "call_method") or not in_place or _is_add(node):
            continue
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
        if node.target == "relu_":
            node.target = "relu"
        source = node.args[0]
        if not isinstance(source, fx.Node):
            continue
        for user in list(source.users):
            if order.get(user, -1) > order[node]:
                user.replace_input_with(source, node)


__all__ = ["Affine", "COVERED_MODULES", "Mean", "ROUTING_FUNCTIONS", "ROUTING_METHODS", "canonize"]
