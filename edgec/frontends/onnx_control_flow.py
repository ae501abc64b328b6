"""ONNX control flow made plain graph, in the ONNX graph before TVM's importer sees it.

An `If` whose condition is a constant (an initializer, a Constant node, or a value the shape folding computed, as
`--const-input sr=16000` makes silero-vad's `sr == 16000`) is replaced by the nodes of the branch it takes. A
`Loop` with a constant trip count whose condition stays true, and a `Scan` over static shapes, are unrolled: one
copy of the body per iteration, scan outputs stacked with Concat. An `If` with a data-dependent condition is left to
TVM's importer, which makes it a Relax If (both branches computed, one result taken). A Loop or Scan that cannot be
unrolled is refused by name.
"""
from __future__ import annotations

import itertools

import numpy as np

from ..errors import EdgecError
from .onnx_semantics import all_nodes, graph_constants

# Iterations one Loop or Scan may be unrolled to: beyond that the graph (and the build) grows out of proportion.
MAX_UNROLL = 1024
_CONST_HINT = "pin the values it depends on with --const-input NAME=FILE.npy and --input-shape"


def lower_control_flow(model, refuse: bool = True) -> list[str]:
    """Take constant If branches and unroll Loop/Scan nodes, repeatedly, in the main graph and in the branches of
    the Ifs that stay; returns one line per node rewritten. A Loop/Scan that cannot be unrolled is refused, or
    with refuse=False (between shape-folding rounds, which may yet make its trip count constant) left as it is."""
    if not any(n.op_type in ("If", "Loop", "Scan") for n in all_nodes(model.graph)):
        return []   # runs on every shape-folding round: spare the weight copies and name walk of a plain graph
    names = _all_names(model.graph)
    done = []
    for graph in _graphs(model.graph):
        while found := _rewrite(model, graph, names, refuse):
            done += found
    return done


def _graphs(graph):
    """The graph, then the branches of its If nodes (what TVM's importer converts), depth first."""
    yield graph
    for node in graph.node:
        if node.op_type == "If":
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from _graphs(attr.g)


def _static_shapes(model) -> dict:
    import onnx

    g = onnx.shape_inference.infer_shapes(model).graph
    return {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in [*g.input, *g.value_info, *g.output]
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")
            and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)}


def _all_names(graph) -> set[str]:
    names = {*(i.name for i in graph.input), *(t.name for t in graph.initializer)}
    for node in graph.node:
        names.update(node.output)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _all_names(sub)
    return names


def _label(node) -> str:
    return f"{node.op_type} node '{node.name or node.output[0]}'"


def _rewrite(model, graph, names, refuse: bool) -> list[str]:
    """One pass over `graph`: the first rewritable node is replaced (its copies go where it was)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    consts = {**graph_constants(model.graph), **graph_constants(graph)}
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "If" and node.input[0] in consts:
            taken = "then_branch" if bool(np.asarray(consts[node.input[0]]).reshape(-1)[0]) else "else_branch"
            body = next(a.g for a in node.attribute if a.name == taken)
            new, inits = _inline(body, {}, dict(zip([o.name for o in body.output], node.output)), names, node.name)
            summary = f"{_label(node)}: condition constant, {taken} taken"
        elif node.op_type in ("Loop", "Scan"):
            try:
                new, inits, summary = (_unroll_loop(node, consts, opset, names) if node.op_type == "Loop"
                                       else _unroll_scan(node, _static_shapes(model), opset, names))
            except EdgecError:
                if refuse:
                    raise
                continue
        else:
            continue
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes[:index] + new + nodes[index + 1:])
        graph.initializer.extend(inits)
        return [summary]
    return []


def _fresh(name: str, names: set[str], scope: str) -> str:
    base = f"{scope}/{name}" if scope else name
    fresh = base if base not in names else next(f"{base}_{i}" for i in itertools.count(1) if f"{base}_{i}" not in names)
    names.add(fresh)
    return fresh


def _inline(body, bindings: dict, outputs: dict, names: set[str], scope: str):
    """Copies of `body`'s nodes and initializers: its inputs read `bindings[name]`, every value it makes gets a fresh
    name, and each of its outputs is copied by an Identity into `outputs[name]`. Returns (nodes, initializers)."""
    import onnx
    from onnx import helper

    rename = dict(bindings)
    inits = []
    for t in body.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = rename[t.name] = _fresh(t.name, names, scope)
        inits.append(copy)
    nodes = []
    for node in body.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        _rename_inputs(copy, rename)
        for i, out in enumerate(copy.output):
            if out:
                copy.output[i] = rename[out] = _fresh(out, names, scope)
        copy.name = _fresh(node.name, names, scope) if node.name else ""
        nodes.append(copy)
    for formal, actual in outputs.items():
        if actual:
            nodes.append(helper.make_node("Identity", [rename.get(formal, formal)], [actual],
                                          name=_fresh(f"{actual}_identity", names, scope)))
    return nodes, inits


def _rename_inputs(node, rename: dict) -> None:
    """The node's inputs, and the outer-scope names its subgraphs read, renamed."""
    for i, name in enumerate(node.input):
        node.input[i] = rename.get(name, name)
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                _rename_inputs(inner, rename)
            for out in sub.output:
                out.name = rename.get(out.name, out.name)


def _const_node(value, names, scope, what):
    from onnx import helper, numpy_helper

    name = _fresh(what, names, scope)
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name)), name


def _stack(parts: list[str], out: str, axis: int, opset: int, names, scope) -> list:
    """Concat of the parts, each given a new axis at `axis` (Unsqueeze's axes became an input at opset 13)."""
    from onnx import helper

    nodes, expanded = [], []
    for part in parts:
        name = _fresh(f"{out}_item", names, scope)
        if opset >= 13:
            axes, axes_name = _const_node(np.array([axis], np.int64), names, scope, f"{out}_axes")
            nodes += [axes, helper.make_node("Unsqueeze", [part, axes_name], [name])]
        else:
            nodes.append(helper.make_node("Unsqueeze", [part], [name], axes=[axis]))
        expanded.append(name)
    nodes.append(helper.make_node("Concat", expanded, [out], axis=axis))
    return nodes


def _unroll_loop(node, consts, opset, names):
    from onnx import helper

    from .onnx_semantics import _attr as attribute

    body = attribute(node, "body")
    label = _label(node)
    trip, cond = (node.input[i] if len(node.input) > i else "" for i in (0, 1))
    if not trip or trip not in consts:
        raise EdgecError(f"{label} runs a number of iterations known only at run time; edgec unrolls loops with a "
                         "constant trip count", _CONST_HINT)
    count = int(np.asarray(consts[trip]).reshape(-1)[0])
    # The condition must stay true: no initial condition or a constant true one, and a body that passes its
    # condition input through unchanged (or outputs a constant true).
    cond_in, cond_out = body.input[1].name, body.output[0].name
    body_consts = graph_constants(body)
    passes = cond_out == cond_in or any(n.op_type == "Identity" and n.output[0] == cond_out and n.input[0] == cond_in
                                        for n in body.node)
    stays = passes or (cond_out in body_consts and bool(np.asarray(body_consts[cond_out]).all()))
    if (cond and not (cond in consts and bool(np.asarray(consts[cond]).all()))) or not stays:
        raise EdgecError(f"{label} stops on a condition computed at run time; edgec unrolls loops with a constant "
                         "trip count only", "export the loop with a fixed number of iterations")
    if count > MAX_UNROLL:
        raise EdgecError(f"{label} runs {count} iterations; edgec unrolls loops of at most {MAX_UNROLL}",
                         "export the loop as a tensor operation, or with fewer iterations")
    carried = list(node.input[2:])
    n_carried = len(carried)
    n_scan = len(body.output) - 1 - n_carried
    if count == 0 and n_scan:
        raise EdgecError(f"{label} runs 0 iterations and has scan outputs (empty tensors of unknown shape)",
                         "export the model without the empty loop")
    scope = node.name or node.output[0]
    nodes, inits, scans = [], [], [[] for _ in range(n_scan)]
    true_node, true_name = _const_node(np.array(True), names, scope, "cond")
    nodes.append(true_node)
    for it in range(count):
        it_node, it_name = _const_node(np.array(it, np.int64), names, scope, f"iter{it}")
        step_scope = f"{scope}/iter{it}"
        outs = {o.name: _fresh(o.name, names, step_scope) for o in body.output[1:]}
        bindings = {body.input[0].name: it_name, body.input[1].name: true_name,
                    **{f.name: a for f, a in zip(body.input[2:], carried)}}
        new, new_inits = _inline(body, bindings, outs, names, step_scope)
        nodes += [it_node, *new]
        inits += new_inits
        produced = [outs[o.name] for o in body.output[1:]]
        carried = produced[:n_carried]
        for i, name in enumerate(produced[n_carried:]):
            scans[i].append(name)
    for final, out in zip(carried, node.output[:n_carried]):
        if out:
            nodes.append(helper.make_node("Identity", [final], [out]))
    for parts, out in zip(scans, node.output[n_carried:]):
        if out:
            nodes += _stack(parts, out, 0, opset, names, scope)
    return nodes, inits, f"{label}: unrolled {count} iteration(s)"


def _unroll_scan(node, shapes, opset, names):
    from onnx import helper

    from .onnx_semantics import _attr as attribute

    label = _label(node)
    if opset < 9:
        raise EdgecError(f"{label} is the opset-8 Scan (batched, with sequence_lens), which edgec does not unroll",
                         "export the model with opset 9 or newer")
    body = attribute(node, "body")
    n_in = int(attribute(node, "num_scan_inputs"))
    states, xs = list(node.input[:len(node.input) - n_in]), list(node.input[len(node.input) - n_in:])
    n_states = len(states)
    n_out = len(body.output) - n_states
    in_axes = list(attribute(node, "scan_input_axes") or [0] * n_in)
    in_dirs = list(attribute(node, "scan_input_directions") or [0] * n_in)
    out_axes = list(attribute(node, "scan_output_axes") or [0] * n_out)
    out_dirs = list(attribute(node, "scan_output_directions") or [0] * n_out)
    lengths = set()
    for x, axis in zip(xs, in_axes):
        if x not in shapes:
            raise EdgecError(f"{label} scans '{x}', whose shape is not static", _CONST_HINT)
        lengths.add(shapes[x][axis % len(shapes[x])])
    if len(lengths) != 1:
        raise EdgecError(f"{label} scans inputs of different lengths {sorted(lengths)}", "fix the model's scan inputs")
    count = lengths.pop()
    if count > MAX_UNROLL or count == 0:
        raise EdgecError(f"{label} scans {count} steps; edgec unrolls scans of 1 to {MAX_UNROLL} steps",
                         "export the scan as a tensor operation")
    scope = node.name or node.output[0]
    nodes, inits, scans = [], [], [[None] * count for _ in range(n_out)]
    for step in range(count):
        step_scope = f"{scope}/step{step}"
        bindings = {f.name: a for f, a in zip(body.input[:n_states], states)}
        for formal, x, axis, rev, shape in zip(body.input[n_states:], xs, in_axes, in_dirs, (shapes[x] for x in xs)):
            index, index_name = _const_node(np.array(count - 1 - step if rev else step, np.int64), names, step_scope,
                                            "index")
            sliced = _fresh(f"{x}_slice", names, step_scope)
            nodes += [index, helper.make_node("Gather", [x, index_name], [sliced], axis=axis % len(shape))]
            bindings[formal.name] = sliced
        outs = {o.name: _fresh(o.name, names, step_scope) for o in body.output}
        new, new_inits = _inline(body, bindings, outs, names, step_scope)
        nodes += new
        inits += new_inits
        produced = [outs[o.name] for o in body.output]
        states = produced[:n_states]
        for i, (name, rev) in enumerate(zip(produced[n_states:], out_dirs)):
            scans[i][count - 1 - step if rev else step] = name
    for final, out in zip(states, node.output[:n_states]):
        if out:
            nodes.append(helper.make_node("Identity", [final], [out]))
    for parts, out, axis in zip(scans, node.output[n_states:], out_axes):
        if out:
            nodes += _stack(parts, out, axis, opset, names, scope)
    return nodes, inits, f"{label}: unrolled {count} step(s)"
