"""Keep ONNX Runtime's blocked (NCHWc) maps blocked from one NCHWc conv to the next.

After :func:`export.nchwc_graph.rewrite_nchwc_convs` every NCHWc conv reorders its input to
the blocked layout and its output back to NCHW. :func:`keep_blocked_between_convs` removes
those round trips wherever the ops between can read the blocked map, so that chains of
layers (an inverted-residual network from end to end) run blocked. ONNX Runtime's own layout
transformer does the same for the convs it rewrites itself, which are only those with
constant weights. A wrong decision here gives wrong numbers, not an error, so each kind of op
is admitted on its own terms (see the function) and everything else keeps the NCHW map.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from export.nchwc_graph import constant_value, fusable_activation, producers_of
from odconv_deploy.layers.ort_nchwc import (
    NCHWC_DOMAIN,
    block_output_channels,
    block_weight,
    span_tile,
)


def tensor_shapes(model: object) -> dict[str, tuple[int | str, ...]]:
    """Shapes of ``model``'s tensors as ONNX shape inference finds them (before the rewrite).

    A dim is its size, or its symbol's name where symbolic; tensors of unknown rank are absent.
    """
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(model).graph
    shapes = {init.name: tuple(init.dims) for init in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                                       for d in tensor.shape.dim)
    return shapes


def _known(shape: tuple[int | str, ...] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _like(node: object, inputs: list[str], output: str) -> object:
    """A node of ``node``'s op and attributes on other inputs, writing ``output``."""
    from onnx import helper

    like = helper.make_node(node.op_type, inputs, [output], domain=node.domain or None)
    like.attribute.extend(node.attribute)
    return like


def _static_conv(node: object, initializers: dict[str, object]
                 ) -> tuple[object, dict[str, object]] | None:
    """``(weight initializer, attributes)`` of a conv with a constant weight, else None.

    The weight must be 4-D float32 held in the model (not external data).
    """
    from onnx import TensorProto, helper

    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    init = initializers.get(node.input[1])
    if init is None or init.data_type != TensorProto.FLOAT or len(init.dims) != 4 or \
            init.data_location == TensorProto.EXTERNAL:
        return None
    return init, {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _blocked_initializer(graph: object, init: object, blocked: torch.Tensor, name: str) -> str:
    """Add ``blocked``, a weight rearranged from ``init``, as initializer ``name``.

    It keeps ``init``'s shape (an NCHWc conv's weight has its logical shape); returns ``name``.
    """
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(
        blocked.contiguous().numpy().reshape(tuple(init.dims)), name))
    return name


def _replace(graph: object, dead: list[object], new_nodes: list[object]) -> None:
    """Put ``new_nodes`` where the first of ``dead`` was, and drop ``dead``."""
    index = list(graph.node).index(dead[0])
    for node in dead:
        graph.node.remove(node)
    for offset, new in enumerate(new_nodes):
        graph.node.insert(index + offset, new)


def _is_reorder_output(node: object) -> bool:
    return node.op_type == "ReorderOutput" and node.domain == NCHWC_DOMAIN


class _BlockedMaps:
    """One pass of :func:`keep_blocked_between_convs`: the graph's indexes and its edits."""

    def __init__(self, graph: object, block: int,
                 shapes: dict[str, tuple[int | str, ...]]) -> None:
        self.graph, self.block, self.shapes = graph, block, shapes
        self.producers = producers_of(graph)
        self.initializers = {init.name: init for init in graph.initializer}
        self.position = {id(node): i for i, node in enumerate(graph.node)}
        self.consumers: dict[str, list[object]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def constant(self, name: str) -> np.ndarray | None:
        return constant_value(self.graph, name, self.producers)

    def int_constant(self, name: str, values: list[int]) -> str:
        """A new int64 initializer ``name`` holding ``values``; returns its name."""
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64),
                                                              name))
        return name

    def blocked_source(self, name: str, channels: int) -> str | None:
        """The blocked map ``name`` was reordered from (same channels), else None."""
        node = self.producers.get(name)
        if node is None or not _is_reorder_output(node) or _channels(node) != channels:
            return None
        return node.input[0]

    def reordered_in(self, name: str, before: object) -> str | None:
        """The blocked copy of ``name`` a ReorderInput made before the node ``before``."""
        return next((r.output[0] for r in self.consumers.get(name, [])
                     if r.op_type == "ReorderInput" and r.domain == NCHWC_DOMAIN
                     and self.position[id(r)] < self.position[id(before)]), None)

    def reads_only_shape(self, node: object) -> bool:
        """Whether ``node`` reads only its input's shape.

        A Shape, or a block guard's probe: a Slice read only by ReorderInputs whose results
        only Shapes read (:func:`~export.nchwc_graph.rewrite_nchwc_convs`).
        """
        if node.op_type == "Shape":
            return True
        readers = self.consumers.get(node.output[0], [])
        return node.op_type == "Slice" and bool(readers) and all(
            r.op_type == "ReorderInput" and r.domain == NCHWC_DOMAIN
            and all(s.op_type == "Shape" for s in self.consumers.get(r.output[0], []))
            for r in readers)

    def spatial_mean(self, node: object) -> bool:
        """A GlobalAveragePool, or a ReduceMean over H and W of a 4-D map keeping the dims."""
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "GlobalAveragePool":
            return True
        if node.op_type != "ReduceMean":
            return False
        attrs = {a.name: a for a in node.attribute}
        if "keepdims" in attrs and attrs["keepdims"].i != 1:
            return False
        axes = (self.constant(node.input[1]) if len(node.input) > 1
                else np.array(attrs["axes"].ints) if "axes" in attrs else None)
        return axes is not None and sorted(int(a) % 4 for a in axes.reshape(-1)) == [2, 3]

    def per_channel(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether ``name`` is a per-channel vector for maps of ``shape``.

        That is ``[n, C, 1, 1]`` (``n`` 1 or the batch) or ``[C, 1, 1]``.
        """
        other = self.shapes.get(name)
        if not _known(other):
            return False
        if len(other) == 3:
            other = (1, *other)
        return len(other) == 4 and other[0] in (1, shape[0]) and other[1:] == (shape[1], 1, 1)

    def elementwise_edit(self, node: object, plain: str, blocked: str, channels: int,
                         prefix: str) -> list[object] | None:
        """``node`` computing ``prefix`` from the blocked map, or None if it cannot.

        Relu, Clip with constant bounds, and an Add or Mul of two same-shape maps (a residual):
        the other map is read blocked where it comes so, and reordered in where it does not
        (one reorder either way, and the sum stays blocked). A per-channel Add or Mul is
        :meth:`per_channel_edit`'s.
        """
        from onnx import helper

        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Relu" or (node.op_type == "Clip" and all(
                self.constant(b) is not None for b in node.input[1:] if b)):
            return [_like(node, [blocked, *node.input[1:]], prefix)]
        if node.op_type not in ("Add", "Mul") or len(node.input) != 2:
            return None
        first, second = (self.shapes.get(name) for name in node.input)
        if not _known(first) or first != second:
            return None  # a broadcast would not be elementwise on the blocked maps
        nodes, inputs = [], []
        for position, name in enumerate(node.input):
            source = blocked if name == plain else (self.blocked_source(name, channels)
                                                    or self.reordered_in(name, node))
            if source is None:
                source = f"{prefix}/input{position}"
                nodes.append(helper.make_node("ReorderInput", [name], [source],
                                              domain=NCHWC_DOMAIN))
            inputs.append(source)
        return [*nodes, _like(node, inputs, prefix)]

    def batch_axis_edit(self, node: object, plain: str, blocked: str, channels: int,
                        prefix: str) -> list[object] | None:
        """A Slice or Concat on the batch axis alone, on blocked maps, or None.

        The per-sample split and join of a fixed batch: each sample's blocked map is
        contiguous, so they read the blocked maps as they are.
        """
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Slice" and node.input[0] == plain and len(node.input) >= 4:
            axes = self.constant(node.input[3])
            if axes is None or [int(a) for a in axes.reshape(-1)] != [0]:
                return None
            return [_like(node, [blocked, *node.input[1:]], prefix)]
        if node.op_type != "Concat" or next(
                (a.i for a in node.attribute if a.name == "axis"), None) != 0:
            return None
        sources = [blocked if name == plain else self.blocked_source(name, channels)
                   for name in node.input]
        if None in sources:
            return None
        return [_like(node, sources, prefix)]

    def per_channel_edit(self, node: object, plain: str, blocked: str, prefix: str
                         ) -> list[object] | None:
        """``map (op) vector`` on the blocked map, as nodes computing ``prefix``, or None.

        The blocked map ``[N, C/b, H, W, b]`` is viewed ``[N, C/b, H*W/t, t*b]`` and the
        vector tiled to ``[n, C/b, 1, t*b]`` (:func:`~odconv_deploy.layers.ort_nchwc.span_tile`).
        """
        from onnx import helper

        shape = self.shapes.get(plain)
        if node.op_type not in ("Add", "Mul") or len(node.input) != 2 or not _known(shape):
            return None
        vector = node.input[1] if node.input[0] == plain else node.input[0]
        if vector == plain or not self.per_channel(vector, shape):
            return None
        n_map, channels, height, width = shape
        b = self.block
        n = 1 if len(self.shapes[vector]) == 3 else self.shapes[vector][0]
        tile = span_tile(height * width, b)

        def const(suffix: str, values: list[int]) -> str:
            return self.int_constant(f"{prefix}/{suffix}_shape", values)

        return [
            helper.make_node("Reshape", [blocked, const("view", [n_map, channels // b,
                                                                 height * width // tile,
                                                                 tile * b])],
                             [f"{prefix}/view"]),
            helper.make_node("Reshape", [vector, const("blocks", [n, channels // b, 1, 1, b])],
                             [f"{prefix}/blocks"]),
            helper.make_node("Expand", [f"{prefix}/blocks",
                                        const("tiles", [n, channels // b, 1, tile, b])],
                             [f"{prefix}/tiles"]),
            helper.make_node("Reshape", [f"{prefix}/tiles",
                                         const("factor", [n, channels // b, 1, tile * b])],
                             [f"{prefix}/factor"]),
            _like(node, [f"{prefix}/view", f"{prefix}/factor"], f"{prefix}/result"),
            helper.make_node("Reshape", [f"{prefix}/result", const("map", list(shape))],
                             [prefix]),
        ]

    def static_conv_edit(self, node: object, plain: str, blocked: str, prefix: str
                         ) -> tuple[list[object], int] | None:
        """A constant-weight conv of the blocked map as an NCHWc conv, and its channels.

        None where it cannot be one (a non-float or external weight, channels off the
        block, grouped but not depthwise).

        ONNX Runtime rewrites such convs itself at load, but reorders their input from NCHW;
        written here, a static conv between ODConv layers (a downsample, a user's own conv)
        keeps the chain blocked.
        """
        from onnx import helper, numpy_helper

        conv = _static_conv(node, self.initializers)
        if conv is None or node.input[0] != plain:
            return None
        init, attrs = conv
        cout, cin_g = int(init.dims[0]), int(init.dims[1])
        groups = int(attrs.get("group", 1))
        depthwise = groups > 1 and cin_g == 1 and cout == groups
        if (groups != 1 and not depthwise) or cout % self.block or cin_g * groups % self.block:
            return None
        weight = torch.from_numpy(numpy_helper.to_array(init).copy())
        name = _blocked_initializer(self.graph, init, block_weight(weight, self.block, depthwise),
                                    f"{prefix}/weight")
        return [helper.make_node("Conv", [blocked, name, *node.input[2:]], [prefix],
                                 domain=NCHWC_DOMAIN, **attrs)], cout

    def edit(self, node: object, reorder: object) -> bool:
        """Make ``node`` read ``reorder``'s blocked input instead of its result, if it can."""
        from onnx import helper

        graph, plain, blocked = self.graph, reorder.output[0], reorder.input[0]
        channels = _channels(reorder)
        # Channels off whole blocks: the blocked map has padding channels (finite values,
        # zero where an NCHWc conv wrote them), which shapes and per-channel ops would see.
        padded = channels % self.block != 0
        if node.op_type == "ReorderInput" and node.domain == NCHWC_DOMAIN:
            for reader in self.consumers.get(node.output[0], []):
                reader.input[:] = [blocked if i == node.output[0] else i for i in reader.input]
            graph.node.remove(node)
            return True
        if not padded and self.reads_only_shape(node):
            node.input[0] = blocked
            return True
        result = node.output[0]
        prefix = f"{node.name or result}/nchwc"
        if self.spatial_mean(node):  # a [N, C, 1, 1] blocked map is laid out as NCHW
            pooled = [f"{prefix}/padded"] if padded else [result]
            new_nodes = [helper.make_node("GlobalAveragePool", [blocked], pooled,
                                          name=f"{node.name}/nchwc", domain=NCHWC_DOMAIN)]
            if padded:  # the padding channels' means dropped
                new_nodes.append(helper.make_node(
                    "Slice", [pooled[0], self.int_constant(f"{prefix}/starts", [0]),
                              self.int_constant(f"{prefix}/ends", [channels]),
                              self.int_constant(f"{prefix}/axes", [1])], [result]))
            _replace(graph, [node], new_nodes)
            return True
        new_nodes = (self.elementwise_edit(node, plain, blocked, channels, prefix)
                     or self.batch_axis_edit(node, plain, blocked, channels, prefix)
                     or (None if padded else self.per_channel_edit(node, plain, blocked,
                                                                   prefix)))
        if new_nodes is None:
            conv = self.static_conv_edit(node, plain, blocked, prefix)
            if conv is None:
                return False
            new_nodes, channels = conv
        # The result is blocked too; its readers get it back in NCHW until edited in turn.
        new_nodes.append(helper.make_node("ReorderOutput", [prefix], [result],
                                          domain=NCHWC_DOMAIN, channels=channels))
        _replace(graph, [node], new_nodes)
        return True


def _channels(reorder: object) -> int:
    return next(a.i for a in reorder.attribute if a.name == "channels")


def keep_blocked_between_convs(model: object, block: int,
                               shapes: dict[str, tuple[int | str, ...]]) -> int:
    """Keep maps blocked between rewritten NCHWc convs instead of reordering them back and forth.

    Where a map reordered back to NCHW is read by ops that can read the blocked one, they
    read it instead:

    - the next NCHWc conv's ``ReorderInput``, and shape reads (the block guard);
    - the attention's spatial mean (``ReduceMean`` over H, W, or ``GlobalAveragePool``), which
      becomes ``nchwc.GlobalAveragePool``: a ``[N, C, 1, 1]`` blocked map is laid out as NCHW;
    - ops whose results are then blocked too: Relu, Clip; an Add or Mul of two same-shape maps
      (a residual; the other map is reordered in if it is not blocked already); an Add or Mul
      by a per-channel vector (an attention factor, a bias), broadcast in the blocked layout;
      a Slice or Concat on the batch axis (the per-sample convs of a fixed batch); and a conv
      with a constant weight (a downsample, a user's own static conv), which becomes an NCHWc
      conv on the weight blocked here.

    A chain also starts at a static conv on fewer channels than a block (an image stem) whose
    output it reorders in: that conv reads the NCHW input as an NCHWc conv.

    A map whose channels are not a multiple of the block is padded when blocked; shapes and
    per-channel ops would see the padding, so such maps go on blocked only into NCHWc convs
    (whose weights are zero for the padding channels), pools (the padding's means cropped),
    Relu, Clip, residual sums and batch-axis ops. ``shapes``: the tensors' shapes before the
    rewrite (:func:`tensor_shapes`).
    Returns the number of ``ReorderOutput`` nodes that are gone.
    """
    from onnx import AttributeProto

    graph = model.graph
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)
           for node in graph.node for a in node.attribute):
        return 0  # a subgraph may read a map by its outer name, unseen here: leave it all
    outputs = {o.name for o in graph.output}
    _start_at_nchw_input_convs(graph, block)
    before = sum(_is_reorder_output(n) for n in graph.node)
    progress = True
    while progress:  # one edit per pass: each changes the indexes
        progress = False
        maps = _BlockedMaps(graph, block, shapes)
        for reorder in [n for n in graph.node if _is_reorder_output(n)]:
            if reorder.output[0] in outputs:
                continue
            readers = maps.consumers.get(reorder.output[0], [])
            if not readers:
                graph.node.remove(reorder)
                progress = True
                break
            if any(maps.edit(node, reorder) for node in readers):
                progress = True
                break
    _drop_unread_initializers(graph)
    return before - sum(_is_reorder_output(n) for n in graph.node)


def _start_at_nchw_input_convs(graph: object, block: int) -> None:
    """Start chains at static convs on fewer channels than a block (an image stem).

    Such a conv whose output a chain reorders in becomes an NCHWc conv reading the NCHW input,
    as ONNX Runtime's own transformer would make it at load (filter ``[C_out/b, C_in, k, k,
    b]``), its ReLU/Clip fused, and a ReorderOutput after it that the chain then removes.
    Left to ORT, its own ReorderOutput and our ReorderInput would both stay.
    """
    from onnx import helper, numpy_helper

    producers = producers_of(graph)
    readers: dict[str, list[object]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    consumers = Counter({name: len(nodes) for name, nodes in readers.items()})
    initializers = {init.name: init for init in graph.initializer}
    for conv in list(graph.node):
        static = _static_conv(conv, initializers)
        if static is None:
            continue
        init, attrs = static
        cout, cin = int(init.dims[0]), int(init.dims[1])
        if int(attrs.get("group", 1)) != 1 or cin >= block or cout % block:
            continue
        out, dead = conv.output[0], [conv]
        activation = fusable_activation(graph, out, producers, consumers)
        if activation is not None:
            act_node, kind, params = activation
            attrs.update(activation=kind, **({"activation_params": params} if params else {}))
            out, dead = act_node.output[0], [conv, act_node]
        if not any(r.op_type == "ReorderInput" and r.domain == NCHWC_DOMAIN
                   for r in readers.get(out, [])):
            continue
        prefix = f"{conv.name or conv.output[0]}/nchwc"
        weight = torch.from_numpy(numpy_helper.to_array(init).copy())
        name = _blocked_initializer(graph, init, block_output_channels(weight, block),
                                    f"{prefix}/weight")
        _replace(graph, dead, [
            helper.make_node("Conv", [conv.input[0], name, *conv.input[2:]], [prefix],
                             domain=NCHWC_DOMAIN, **attrs),
            helper.make_node("ReorderOutput", [prefix], [out], domain=NCHWC_DOMAIN,
                             channels=cout)])


def _drop_unread_initializers(graph: object) -> None:
    read = {name for node in graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in read]
    if len(keep) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
