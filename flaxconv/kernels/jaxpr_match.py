"""Reading a traced jaxpr for the seam (:mod:`flaxconv.kernels.seam`): which equations are
convolutions and pools it covers, the conv -> [+ bias] -> relu -> pool chains they form, and
their descriptions for :func:`~flaxconv.kernels.seam.explain`. Nothing here computes; the
plans and their evaluation are the seam's."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
from jax.extend import core as jex

from flaxconv.kernels.policy import ConvSpec
from flaxconv.kernels.precision import precision_name

# Primitives of nested bodies the seam plans into, and the ones it replaces.
JIT = ("pjit", "jit")
REMAT = ("remat2", "checkpoint", "remat")
TARGETS = ("conv_general_dilated", "reduce_window_max", "reduce_window_sum")
NHWC_SPECS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


class Graph:
    """Who produces and who consumes each variable of a jaxpr."""

    def __init__(self, jaxpr):
        self.eqns = jaxpr.eqns
        self.producer = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars}
        self.consumers: dict[Any, list[int]] = collections.defaultdict(list)
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if not isinstance(v, jex.Literal):
                    self.consumers[v].append(i)
        self.outputs = {v for v in jaxpr.outvars if not isinstance(v, jex.Literal)}

    def sole_consumer(self, var) -> int | None:
        """The one equation that reads ``var``, once, if nothing else (no output) does."""
        users = self.consumers.get(var, [])
        if len(users) != 1 or var in self.outputs:
            return None
        return users[0]


def conv_spec(eqn) -> tuple[ConvSpec | None, str]:
    """The :class:`ConvSpec` of a covered convolution, or None and the reason it is not."""
    p = eqn.params
    lhs, rhs = (v.aval for v in eqn.invars)
    dims = p["dimension_numbers"]
    specs = (tuple(dims.lhs_spec), tuple(dims.rhs_spec), tuple(dims.out_spec))
    if lhs.ndim != 4 or specs != NHWC_SPECS:
        return None, "not an NHWC/HWIO 2-D convolution"
    if any(d != 1 for d in (*p["lhs_dilation"], *p["rhs_dilation"])):
        return None, "dilated convolution"
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None, "grouped convolution"
    if lhs.dtype != rhs.dtype or not any(lhs.dtype == d for d in FLOATS):
        return None, f"dtype {lhs.dtype}/{rhs.dtype}"
    if p.get("preferred_element_type") not in (None, lhs.dtype):
        return None, f"preferred_element_type {p['preferred_element_type']}"
    precision, covered = precision_name(p.get("precision"))
    if not covered:
        return None, f"precision {p['precision']}"
    padding = tuple(tuple(int(q) for q in pair) for pair in p["padding"])
    if any(q < 0 for pair in padding for q in pair):
        return None, "negative padding"
    output_size = tuple(eqn.outvars[0].aval.shape[1:3])
    return ConvSpec(tuple(rhs.shape), tuple(p["window_strides"]), padding, lhs.dtype,
                    output_size, precision), ""


def match_block(graph: Graph, i: int, spec: ConvSpec):
    """``(chain, tail, bias, window)`` when convolution ``i`` starts conv -> [+ bias] ->
    relu -> max-pool (or -> max-pool -> relu), each value used only by the next step; the
    block's output is the tail equation's. None otherwise."""
    c_out = spec.kernel_shape[3]
    chain, var = [i], graph.eqns[i].outvars[0]
    dtype = var.aval.dtype
    j = graph.sole_consumer(var)
    bias = None
    if j is not None and graph.eqns[j].primitive.name == "add":
        others = [v for v in graph.eqns[j].invars if v is not var]
        bias = channel_vector(graph, others[0], c_out, dtype) if len(others) == 1 else None
        if bias is None:
            return None
        chain.append(j)
        var = graph.eqns[j].outvars[0]
        j = graph.sole_consumer(var)
    if j is None:
        return None
    if relu_input(graph.eqns[j]) is var:
        k = graph.sole_consumer(graph.eqns[j].outvars[0])
        window = square_window(graph.eqns[k]) if k is not None else None
        return (chain + [j], k, bias, window) if window else None
    window = square_window(graph.eqns[j])
    if window and graph.eqns[j].primitive.name == "reduce_window_max":
        k = graph.sole_consumer(graph.eqns[j].outvars[0])
        if k is not None and relu_input(graph.eqns[k]) is graph.eqns[j].outvars[0]:
            return chain + [j], k, bias, window
    return None


def channel_vector(graph: Graph, var, channels: int, dtype):
    """``var`` (or what it was broadcast from) when it holds one value per channel:
    shape ``(C,)`` or ``(1, 1, 1, C)`` of ``dtype``; None otherwise."""
    if isinstance(var, jex.Literal) or var.aval.dtype != dtype:
        return None
    shape = tuple(var.aval.shape)
    if shape in ((channels,), (1, 1, 1, channels)):
        return var
    producer = graph.producer.get(var)
    if producer is not None and graph.eqns[producer].primitive.name == "broadcast_in_dim":
        eqn = graph.eqns[producer]
        source = eqn.invars[0]
        if (not isinstance(source, jex.Literal) and tuple(source.aval.shape) == (channels,)
                and tuple(eqn.params["broadcast_dimensions"]) == (3,)):
            return source
    return None


def relu_input(eqn):
    """The input variable when ``eqn`` is ``max(x, 0)`` (``jnp.maximum``) or
    ``jax.nn.relu`` (a ``custom_jvp`` around it); None otherwise."""
    name = eqn.primitive.name
    if name == "max":
        return max_with_zero(eqn)
    if name == "custom_jvp_call" and len(eqn.invars) == 1 and len(eqn.outvars) == 1:
        inner = eqn.params.get("call_jaxpr")
        jaxpr = getattr(inner, "jaxpr", inner)
        while jaxpr is not None and len(jaxpr.eqns) == 1 and jaxpr.eqns[0].primitive.name in JIT:
            nested = jaxpr.eqns[0]
            if list(nested.invars) != list(jaxpr.invars):
                return None
            jaxpr = nested.params["jaxpr"].jaxpr
        if (jaxpr is not None and len(jaxpr.eqns) == 1 and len(jaxpr.invars) == 1
                and max_with_zero(jaxpr.eqns[0]) is jaxpr.invars[0]):
            return eqn.invars[0]
    return None


def max_with_zero(eqn):
    if eqn.primitive.name != "max" or len(eqn.invars) != 2:
        return None
    a, b = eqn.invars
    for value, zero in ((a, b), (b, a)):
        if (isinstance(zero, jex.Literal) and jnp.ndim(zero.val) == 0 and zero.val == 0
                and not isinstance(value, jex.Literal)
                and value.aval.shape == eqn.outvars[0].aval.shape):
            return value
    return None


def pool_window(eqn) -> tuple[int, int] | None:
    """``(wh, ww)`` of a non-overlapping, unpadded NHWC pool on floats; None otherwise."""
    if eqn.primitive.name not in ("reduce_window_max", "reduce_window_sum"):
        return None
    p = eqn.params
    dims, strides = tuple(p["window_dimensions"]), tuple(p["window_strides"])
    aval = eqn.invars[0].aval
    if (aval.ndim != 4 or dims != strides or dims[0] != 1 or dims[3] != 1
            or any(q != 0 for pair in p["padding"] for q in pair)
            or any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"]))
            or not any(aval.dtype == d for d in FLOATS)):
        return None
    return int(dims[1]), int(dims[2])


def square_window(eqn) -> int | None:
    window = pool_window(eqn) if eqn.primitive.name == "reduce_window_max" else None
    return window[0] if window and window[0] == window[1] else None


# --------------------------------------------------------------------------- reporting


def subjaxprs(eqn) -> Iterable[Any]:
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jex.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex.Jaxpr):
                yield item


def target_eqns(jaxpr) -> list[Any]:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in TARGETS:
            found.append(eqn)
        found += target_eqns_of(eqn)
    return found


def target_eqns_of(eqn) -> list[Any]:
    return [e for sub in subjaxprs(eqn) for e in target_eqns(sub)]


def contains_targets(eqn) -> bool:
    return bool(target_eqns_of(eqn))


def layer_name(eqn) -> str:
    return str(eqn.source_info.name_stack)


def describe(eqn) -> str:
    p = eqn.params
    if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval for v in eqn.invars)
        strides = "x".join(map(str, p["window_strides"]))
        padding = ",".join(f"{lo}/{hi}" for lo, hi in p["padding"])
        if eqn.params["dimension_numbers"].rhs_spec == NHWC_SPECS[1] and rhs.ndim == 4:
            kh, kw, c_in, c_out = rhs.shape
            precision, covered = precision_name(p.get("precision"))
            at = f" precision {precision}" if precision else ""
            at = at if covered else f" precision {p['precision']}"
            return (f"conv {kh}x{kw} stride {strides} pad {padding} {c_in}->{c_out} "
                    f"{lhs.dtype}{at}")
        return f"conv {rhs.shape} stride {strides} pad {padding}"
    kind = "max_pool" if eqn.primitive.name == "reduce_window_max" else "sum_pool"
    window = "x".join(map(str, p["window_dimensions"][1:3]))
    stride = "x".join(map(str, p["window_strides"][1:3]))
    return f"{kind} {window} stride {stride}"
