"""Rewrite the convs of ``ort_nchwc`` layers in an exported ONNX graph to ORT's NCHWc ops.

An ``ort_nchwc`` layer computes its weight in ONNX Runtime's blocked filter layout and, in
PyTorch, unblocks it for an ordinary conv, so the tracer writes::

    Reshape(blocked, [C_out/b, C_in/b, k, k, b, b]) -> Transpose(0,5,1,4,2,3)
        -> Reshape([C_out, C_in, k, k]) -> Conv          (depthwise: [C/b, k, k, b], (0,3,1,2))

(with a Slice before the Conv that crops the padding channels where ``C_in`` or ``C_out`` is
not a multiple of ``b``: the blocked maps then carry ``ceil(C/b) * b`` channels, and the
rewritten conv a zero-padded bias).

This pass replaces each such chain with the ops ORT's own layout transformer produces for a
static conv, fed the blocked weight directly::

    ReorderInput(x) -> com.microsoft.nchwc.Conv(W = Reshape(blocked, [C_out, C_in, k, k]))
        -> ReorderOutput(channels=C_out)

(It is done on the ONNX graph because PyTorch's exporter loses every shape downstream of a
custom-domain op, which breaks the export of the next ``dynamic_weight`` conv.) A guard
makes a CPU with another block fail instead of reading the weight in the wrong layout:
``ReorderInput`` pads a 4-channel slice of the input to one block of the running CPU, and
the reordered input's reshape to ``[N, ceil(C/b) * that block, H, W]`` is the identity only
if the two match
(ONNX Runtime folds it away at load; on a mismatch it fails with a Reshape error). One guard
fails the whole graph, so only the first rewritten conv carries it.

:mod:`export.nchwc_chains` then removes the reorders between such convs wherever the ops
between can read the blocked map.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from odconv_deploy.layers.ort_nchwc import NCHWC_DOMAIN

#: Transpose permutations that unblock a weight: regular (rank 6) and depthwise (rank 4).
UNBLOCK_PERMS = {6: [0, 5, 1, 4, 2, 3], 4: [0, 3, 1, 2]}


def producers_of(graph: object) -> dict[str, object]:
    """Each tensor name of ``graph`` (an ONNX GraphProto) -> the node that writes it."""
    return {out: node for node in graph.node for out in node.output}


def constant_value(graph: object, name: str, producers: dict[str, object]) -> np.ndarray | None:
    """The value of ``name`` if an initializer or a Constant node holds it, else None.

    Identity nodes are looked through: the torchscript exporter stores equal constants once
    and feeds the other uses through an Identity (two zero biases, for one).
    """
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = producers.get(name)
    if node is not None and node.op_type == "Identity":
        return constant_value(graph, node.input[0], producers)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _crop(graph: object, node: object, producers: dict[str, object]) -> dict[int, int] | None:
    """``{axis: end}`` of a Slice that keeps the leading ``end`` entries of axes 0 and 1."""
    if node.op_type != "Slice" or len(node.input) < 4:
        return None
    starts, ends, axes = (constant_value(graph, name, producers) for name in node.input[1:4])
    steps = constant_value(graph, node.input[4], producers) if len(node.input) > 4 else None
    if starts is None or ends is None or axes is None or starts.any() or (
            steps is not None and (steps != 1).any()):
        return None
    crop = {int(a): int(e) for a, e in zip(axes.reshape(-1), ends.reshape(-1), strict=True)}
    return crop if set(crop) <= {0, 1} else None


def _unblock_chain(graph: object, conv: object, producers: dict[str, object], block: int
                   ) -> tuple[str, list[object], np.ndarray, int] | None:
    """Where ``conv``'s weight comes from, if it is an unblocked one of this block, else None.

    That is the blocked weight's name, the chain's nodes, the blocked weight's shape as a conv
    weight (padding channels included) and the conv's output channels. A layer with padding
    channels crops the unblocked weight (one or two Slices).
    """
    outer = producers.get(conv.input[1])
    crops, out_channels = [], None
    while outer is not None and (crop := _crop(graph, outer, producers)) is not None:
        crops.append(outer)
        out_channels = crop.get(0, out_channels)
        outer = producers.get(outer.input[0])
    if outer is None or outer.op_type != "Reshape":
        return None
    transpose = producers.get(outer.input[0])
    if transpose is None or transpose.op_type != "Transpose":
        return None
    inner = producers.get(transpose.input[0])
    if inner is None or inner.op_type != "Reshape":
        return None
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    blocked_shape = constant_value(graph, inner.input[1], producers)
    if blocked_shape is None or perm != UNBLOCK_PERMS.get(len(blocked_shape)):
        return None
    weight_shape = constant_value(graph, outer.input[1], producers)
    if weight_shape is None:
        return None  # the conv weight's shape must be known
    if any(int(d) != block for d in blocked_shape[len(blocked_shape) // 2 + 1:]):
        return None  # the block axes (last one or two) must be this graph's block
    channels = int(weight_shape[0]) if out_channels is None else out_channels
    return inner.input[0], [*crops, outer, transpose, inner], weight_shape, channels


def fusable_activation(graph: object, conv_out: str, producers: dict[str, object],
                        consumers: Counter) -> tuple[object, str, list[float]] | None:
    """``(node, kind, params)`` of a Relu or constant Clip that alone reads ``conv_out``."""
    if consumers[conv_out] != 1 or any(o.name == conv_out for o in graph.output):
        return None
    node = next(n for n in graph.node if conv_out in n.input)
    if node.op_type == "Relu":
        return node, "Relu", []
    if node.op_type != "Clip" or len(node.input) != 3:
        return None
    bounds = [constant_value(graph, name, producers) for name in node.input[1:]]
    if any(b is None or b.size != 1 for b in bounds):
        return None
    return node, "Clip", [float(b.reshape(())) for b in bounds]


def rewrite_nchwc_convs(model: object, block: int) -> int:
    """Replace every unblocked-weight conv of ``model`` (an ONNX ModelProto) in place.

    Args:
        model: The exported model; gains the NCHWc opset import when a conv is rewritten.
        block: The NCHWc block the layers were laid out for.

    Returns:
        The number of convs rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    producers = producers_of(graph)
    consumers = Counter(name for node in graph.node for name in node.input)
    replaced: dict[int, list[object]] = {}  # the conv's index in graph.node -> its new nodes
    dead: set[int] = set()
    for index, conv in enumerate(list(graph.node)):
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        chain = _unblock_chain(graph, conv, producers, block)
        if chain is None:
            continue
        blocked, chain_nodes, weight_shape, out_channels = chain
        prefix = f"{conv.name or conv.output[0]}/nchwc"
        bias = conv.input[2:3]
        if bias and out_channels < int(weight_shape[0]):  # zero for the padding channels
            values = constant_value(graph, bias[0], producers)
            if values is None:
                continue  # left unrewritten: the export reports it
            bias = [f"{prefix}/bias"]
            graph.initializer.append(numpy_helper.from_array(
                np.pad(values, (0, int(weight_shape[0]) - out_channels)), bias[0]))

        def const(suffix: str, values: list[int], prefix: str = prefix) -> str:
            name = f"{prefix}/{suffix}"
            graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
            return name

        x, out = conv.input[0], conv.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        activation = fusable_activation(graph, out, producers, consumers)
        if activation is not None:  # the kernel applies it while writing (as ORT does)
            act_node, kind, params = activation
            attrs.update(activation=kind, **({"activation_params": params} if params else {}))
            dead.add(id(act_node))
            out = act_node.output[0]
        x_nchwc = f"{prefix}/x_reordered"
        nodes = [helper.make_node("ReorderInput", [x], [x_nchwc], domain=NCHWC_DOMAIN)]
        if not replaced:  # one guard fails the whole graph: the first conv carries it
            x_nchwc = f"{prefix}/x_nchwc"
            nodes = [
                helper.make_node("Slice", [x, const("probe_starts", [0, 0, 0, 0]),
                                           const("probe_ends", [1, 4, 1, 1])],
                                 [f"{prefix}/probe"]),
                helper.make_node("ReorderInput", [f"{prefix}/probe"],
                                 [f"{prefix}/probe_blocked"], domain=NCHWC_DOMAIN),
                helper.make_node("Shape", [f"{prefix}/probe_blocked"], [f"{prefix}/block_here"]),
                helper.make_node("Shape", [x], [f"{prefix}/x_shape"]),
                helper.make_node("Add", [f"{prefix}/x_shape",
                                         const("round_up", [0, block - 1, 0, 0])],
                                 [f"{prefix}/x_shape_up"]),
                helper.make_node("Div", [f"{prefix}/x_shape_up",
                                         const("per_block", [1, block, 1, 1])],
                                 [f"{prefix}/x_blocks"]),
                helper.make_node("Mul", [f"{prefix}/x_blocks", f"{prefix}/block_here"],
                                 [f"{prefix}/x_guarded_shape"]),
                *nodes,
                helper.make_node("Reshape", [f"{prefix}/x_reordered",
                                             f"{prefix}/x_guarded_shape"], [x_nchwc]),
            ]
        nodes += [
            helper.make_node("Reshape", [blocked, const("weight_shape",
                                                        [int(d) for d in weight_shape])],
                             [f"{prefix}/weight"]),
            helper.make_node("Conv", [x_nchwc, f"{prefix}/weight", *bias, *conv.input[3:]],
                             [f"{prefix}/y_nchwc"], domain=NCHWC_DOMAIN, **attrs),
            helper.make_node("ReorderOutput", [f"{prefix}/y_nchwc"], [out], domain=NCHWC_DOMAIN,
                             channels=out_channels),
        ]
        replaced[index] = nodes
        for node in chain_nodes:  # the unblocking chain dies with the conv if nothing else reads it
            if consumers[node.output[0]] == 1:
                dead.add(id(node))
    if not replaced:
        return 0
    new_nodes = []
    for index, node in enumerate(graph.node):
        if index in replaced:
            new_nodes.extend(replaced[index])
        elif id(node) not in dead:
            new_nodes.append(node)
    # The dead chains' shape constants: drop those nothing reads any more.
    read = {name for node in new_nodes for name in node.input}
    new_nodes = [n for n in new_nodes if n.op_type != "Constant" or n.output[0] in read]
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == NCHWC_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(NCHWC_DOMAIN, 1))
    return len(replaced)


def count_unblocked_convs(model: object, block: int) -> int:
    """Convs of ``model`` still reading an unblocked weight (0 after the rewrite)."""
    producers = producers_of(model.graph)
    return sum(1 for node in model.graph.node
               if node.op_type == "Conv" and node.domain in ("", "ai.onnx")
               and _unblock_chain(model.graph, node, producers, block) is not None)


