"""The seam: a function transformation that gives any model the fast formulations.

``rewrite(fn)`` traces ``fn`` once to a jaxpr (``jax.make_jaxpr``), plans a formulation for
every convolution and pool in it (:mod:`flaxconv.kernels.policy`), and evaluates the jaxpr
with those equations replaced. Everything else — dense layers, BatchNorm, dropout, the
random number generators, the user's own ``custom_jvp``/``custom_vjp`` functions — is bound
again exactly as traced. Because the replacement happens on the forward computation,
``jax.grad``/``vmap``/``scan``/``jit`` applied around the rewritten function see the
custom VJPs of the formulations instead of JAX's convolution rules.

What it recognizes, in a jaxpr of any origin (Flax linen, NNX, plain ``jax.lax``):

* ``conv_general_dilated`` with NHWC/HWIO/NHWC dimension numbers, no dilation, no feature
  or batch groups, a floating dtype and the default precision: any stride, padding and
  kernel size, with or without bias. Others (grouped, dilated, NCHW, ...) keep XLA's.
* ``conv -> [+ bias] -> relu -> max-pool`` and ``conv -> [+ bias] -> max-pool -> relu`` with
  a square non-overlapping pool and a stride-1 convolution, when every intermediate value
  is used only by the next step (so a captured intermediate, e.g. a feature map, stays
  exact): one block (:mod:`flaxconv.kernels.blocks`).
* ``reduce_window_max`` / ``reduce_window_sum`` (``nn.max_pool``/``nn.avg_pool``) with window
  = stride and no padding, a relu right before or after a max-pool folded in. Overlapping
  or padded pools keep XLA's.
* the same inside nested ``jax.jit`` and ``jax.checkpoint`` (``nn.remat``) bodies; a
  convolution inside another control-flow body (``lax.scan``, ``cond``, ``while``) keeps
  XLA's and is reported as such.

A function the seam cannot rewrite runs as written: an error raised while tracing ``fn``
is re-raised by calling ``fn`` itself, and a failure of the rewrite (a bug of ours, never
the user's) warns once and falls back to ``fn``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from flaxconv.kernels.blocks import conv_relu_pool
from flaxconv.kernels.conv import conv2d
from flaxconv.kernels.policy import ConvSpec, Policy, resolve
from flaxconv.kernels.pool import max_pool, sum_pool

_JIT = ("pjit", "jit")
_REMAT = ("remat2", "checkpoint", "remat")
_TARGETS = ("conv_general_dilated", "reduce_window_max", "reduce_window_sum")
_NHWC_SPECS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Choice:
    """What the seam does with one layer of a traced function.

    Attributes:
      layer: the layer's name scope in the trace (a Flax module path such as
        ``"ConvStack/conv_1"``; empty for plain JAX code).
      op: the operation, e.g. ``"conv 3x3 stride 1 VALID 32->64"`` or ``"max_pool 2x2"``.
      formulation: what computes it, e.g. ``"winograd (+ bias, relu, max_pool 2x2)"``,
        ``"im2col"``, or ``"xla (grouped convolution)"`` for a fallback with its reason.
    """

    layer: str
    op: str
    formulation: str

    @property
    def fallback(self) -> bool:
        """Whether XLA's own operation runs (the seam does not cover this layer)."""
        return self.formulation.startswith("xla (")


def rewrite(fn: Callable, policy: str | Policy | None = None) -> Callable:
    """``fn`` with its convolutions and pools computed by the fastest measured formulation.

    Args:
      fn: a function of pytrees of arrays (e.g. ``lambda v, x: model.apply(v, x,
        train=True)``); non-array arguments belong in its closure.
      policy: a :class:`~flaxconv.kernels.policy.Policy` or one of
        :data:`~flaxconv.kernels.policy.POLICIES` (``"xla"`` returns ``fn`` unchanged);
        ``None`` reads ``FLAXCONV_KERNELS`` (default ``"auto"``: per backend, read when
        the function is traced).

    Returns:
      A function with the signature of ``fn`` and the same values and gradients, to float32
      rounding. It traces ``fn`` once per call under a transformation (``jit`` caches it).
    """

    @functools.wraps(fn)
    def rewritten(*args):
        table = policy if isinstance(policy, Policy) else resolve(policy)
        if not table.rewrite:
            return fn(*args)
        traced = _trace(fn, args)
        if traced is None:  # fn itself fails: let it raise its own error
            return fn(*args)
        closed, out_tree = traced
        try:
            program = _plan(closed.jaxpr, table)
            if not program.actions:
                return fn(*args)
            out = _run(program, closed.consts, jax.tree.leaves(args))
        except Exception as error:  # noqa: BLE001 - the seam must never break a model
            _warn_once(fn, error)
            return fn(*args)
        return jax.tree.unflatten(out_tree, out)

    return rewritten


def explain(fn: Callable, *args: Any, policy: str | Policy | None = None) -> list[Choice]:
    """The :class:`Choice` for every convolution and pool of ``fn(*args)``, in trace order.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s; nothing is computed.
    """
    table = policy if isinstance(policy, Policy) else resolve(policy)
    traced = _trace(fn, args)
    if traced is None:
        fn(*args)  # raises fn's own error
    closed, _ = traced
    if not table.rewrite:
        return [Choice(_layer(e), _describe(e), "xla (kernels='xla')")
                for e in _target_eqns(closed.jaxpr)]
    return [choice for _, choice in _plan(closed.jaxpr, table).choices]


def _trace(fn: Callable, args: Sequence[Any]):
    leaves, in_tree = jax.tree.flatten(args)

    def flat_fn(*flat):
        return fn(*jax.tree.unflatten(in_tree, flat))

    try:
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves)
    except Exception:  # noqa: BLE001 - re-raised by the caller calling fn itself
        return None
    return closed, jax.tree.structure(out_shape)


_warned: set[str] = set()


def _warn_once(fn: Callable, error: Exception) -> None:
    key = f"{getattr(fn, '__qualname__', fn)}: {type(error).__name__}: {error}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"flaxconv.kernels could not rewrite {getattr(fn, '__qualname__', fn)} "
            f"({type(error).__name__}: {error}); it runs with XLA's own operations",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- evaluation


Reader = Callable[[Any], Any]
Action = Callable[[Reader], list[Any]]


@dataclasses.dataclass
class _Program:
    """A jaxpr with replacements: ``actions[i]`` computes the outputs of equation ``i``
    from the environment; the equations in ``skip`` are folded into a later action."""

    jaxpr: Any
    actions: dict[int, Action] = dataclasses.field(default_factory=dict)
    skip: set[int] = dataclasses.field(default_factory=set)
    choices: list[tuple[int, Choice]] = dataclasses.field(default_factory=list)  # (eqn, .)


def _run(program: _Program, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluates ``program.jaxpr`` on ``args`` (flat), binding every equation that has no
    action again with its own parameters, as ``jax.core.eval_jaxpr`` does."""
    jaxpr = program.jaxpr
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for i, eqn in enumerate(jaxpr.eqns):
        if i in program.skip:
            continue
        if i in program.actions:
            outs = program.actions[i](read)
        else:
            outs = _bind(eqn, map(read, eqn.invars))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for var, value in zip(eqn.outvars, outs, strict=True):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn, args) -> Any:
    """Binds ``eqn``'s primitive again on ``args``, as ``jax.core.eval_jaxpr`` does.
    ``get_bind_params`` returns ``(subfuns, params)`` before jax 0.10 and ``params`` since."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*subfuns, *args, **params)


# --------------------------------------------------------------------------- planning


def _plan(jaxpr, table: Policy) -> _Program:
    """Chooses a formulation for every convolution and pool of ``jaxpr``."""
    program = _Program(jaxpr)
    graph = _Graph(jaxpr)
    for i, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            _plan_conv(program, graph, i, table)
        elif name in _JIT + _REMAT and _contains_targets(eqn):
            _plan_nested(program, i, table)
        elif _contains_targets(eqn):
            program.choices += [
                (i, Choice(_layer(e), _describe(e), f"xla (inside {name})"))
                for e in _target_eqns_of(eqn)
            ]
    for i, eqn in enumerate(jaxpr.eqns):
        if i in program.skip or i in program.actions:
            continue
        if eqn.primitive.name in ("reduce_window_max", "reduce_window_sum"):
            _plan_pool(program, graph, i)
    program.choices.sort(key=lambda pair: pair[0])  # trace order
    return program


class _Graph:
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


def _plan_conv(program: _Program, graph: _Graph, i: int, table: Policy) -> None:
    eqn = graph.eqns[i]
    spec, reason = _conv_spec(eqn)
    if spec is None:
        program.choices.append((i, Choice(_layer(eqn), _describe(eqn), f"xla ({reason})")))
        return
    block = _match_block(graph, i, spec) if spec.strides == (1, 1) else None
    if block is not None:
        chain, tail, bias, window = block
        formulation = table.block(spec, window)
        conv_formulation = table.conv(spec)
        x, kernel = eqn.invars

        def action(read, x=x, kernel=kernel, bias=bias, window=window):
            return [conv_relu_pool(read(x), read(kernel),
                                   None if bias is None else read(bias).reshape(-1),
                                   spec.padding, window, formulation, conv_formulation)]

        program.actions[tail] = action
        program.skip.update(chain)
        extras = ("+ bias, " if bias is not None else "") + f"relu, max_pool {window}x{window}"
        detail = formulation if formulation != "unfused" else f"{conv_formulation}, unfused"
        program.choices.append(
            (i, Choice(_layer(eqn), _describe(eqn), f"{detail} ({extras})")))
        return
    formulation = table.conv(spec)

    def conv_action(read, eqn=eqn):
        x, kernel = map(read, eqn.invars)
        return [conv2d(x, kernel, spec.strides, spec.padding, formulation)]

    program.actions[i] = conv_action
    program.choices.append((i, Choice(_layer(eqn), _describe(eqn), formulation)))


def _conv_spec(eqn) -> tuple[ConvSpec | None, str]:
    """The :class:`ConvSpec` of a covered convolution, or None and the reason it is not."""
    p = eqn.params
    lhs, rhs = (v.aval for v in eqn.invars)
    dims = p["dimension_numbers"]
    specs = (tuple(dims.lhs_spec), tuple(dims.rhs_spec), tuple(dims.out_spec))
    if lhs.ndim != 4 or specs != _NHWC_SPECS:
        return None, "not an NHWC/HWIO 2-D convolution"
    if any(d != 1 for d in (*p["lhs_dilation"], *p["rhs_dilation"])):
        return None, "dilated convolution"
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None, "grouped convolution"
    if lhs.dtype != rhs.dtype or not any(lhs.dtype == d for d in _FLOATS):
        return None, f"dtype {lhs.dtype}/{rhs.dtype}"
    if p.get("preferred_element_type") not in (None, lhs.dtype):
        return None, f"preferred_element_type {p['preferred_element_type']}"
    if p.get("precision") not in (None, jax.lax.Precision.DEFAULT,
                                  (jax.lax.Precision.DEFAULT,) * 2):
        return None, f"precision {p['precision']}"
    padding = tuple(tuple(int(q) for q in pair) for pair in p["padding"])
    if any(q < 0 for pair in padding for q in pair):
        return None, "negative padding"
    output_size = tuple(eqn.outvars[0].aval.shape[1:3])
    return ConvSpec(tuple(rhs.shape), tuple(p["window_strides"]), padding, lhs.dtype,
                    output_size), ""


def _match_block(graph: _Graph, i: int, spec: ConvSpec):
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
        bias = _channel_vector(graph, others[0], c_out, dtype) if len(others) == 1 else None
        if bias is None:
            return None
        chain.append(j)
        var = graph.eqns[j].outvars[0]
        j = graph.sole_consumer(var)
    if j is None:
        return None
    if _relu_input(graph.eqns[j]) is var:
        k = graph.sole_consumer(graph.eqns[j].outvars[0])
        window = _square_window(graph.eqns[k]) if k is not None else None
        return (chain + [j], k, bias, window) if window else None
    window = _square_window(graph.eqns[j])
    if window and graph.eqns[j].primitive.name == "reduce_window_max":
        k = graph.sole_consumer(graph.eqns[j].outvars[0])
        if k is not None and _relu_input(graph.eqns[k]) is graph.eqns[j].outvars[0]:
            return chain + [j], k, bias, window
    return None


def _channel_vector(graph: _Graph, var, channels: int, dtype):
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


def _relu_input(eqn):
    """The input variable when ``eqn`` is ``max(x, 0)`` (``jnp.maximum``) or
    ``jax.nn.relu`` (a ``custom_jvp`` around it); None otherwise."""
    name = eqn.primitive.name
    if name == "max":
        return _max_with_zero(eqn)
    if name == "custom_jvp_call" and len(eqn.invars) == 1 and len(eqn.outvars) == 1:
        inner = eqn.params.get("call_jaxpr")
        jaxpr = getattr(inner, "jaxpr", inner)
        while jaxpr is not None and len(jaxpr.eqns) == 1 and jaxpr.eqns[0].primitive.name in _JIT:
            nested = jaxpr.eqns[0]
            if list(nested.invars) != list(jaxpr.invars):
                return None
            jaxpr = nested.params["jaxpr"].jaxpr
        if (jaxpr is not None and len(jaxpr.eqns) == 1 and len(jaxpr.invars) == 1
                and _max_with_zero(jaxpr.eqns[0]) is jaxpr.invars[0]):
            return eqn.invars[0]
    return None


def _max_with_zero(eqn):
    if eqn.primitive.name != "max" or len(eqn.invars) != 2:
        return None
    a, b = eqn.invars
    for value, zero in ((a, b), (b, a)):
        if (isinstance(zero, jex.Literal) and jnp.ndim(zero.val) == 0 and zero.val == 0
                and not isinstance(value, jex.Literal)
                and value.aval.shape == eqn.outvars[0].aval.shape):
            return value
    return None


def _pool_window(eqn) -> tuple[int, int] | None:
    """``(wh, ww)`` of a non-overlapping, unpadded NHWC pool on floats; None otherwise."""
    if eqn.primitive.name not in ("reduce_window_max", "reduce_window_sum"):
        return None
    p = eqn.params
    dims, strides = tuple(p["window_dimensions"]), tuple(p["window_strides"])
    aval = eqn.invars[0].aval
    if (aval.ndim != 4 or dims != strides or dims[0] != 1 or dims[3] != 1
            or any(q != 0 for pair in p["padding"] for q in pair)
            or any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"]))
            or not any(aval.dtype == d for d in _FLOATS)):
        return None
    return int(dims[1]), int(dims[2])


def _square_window(eqn) -> int | None:
    window = _pool_window(eqn) if eqn.primitive.name == "reduce_window_max" else None
    return window[0] if window and window[0] == window[1] else None


def _plan_pool(program: _Program, graph: _Graph, i: int) -> None:
    eqn = graph.eqns[i]
    window = _pool_window(eqn)
    if window is None:
        program.choices.append((i, Choice(_layer(eqn), _describe(eqn),
                                          "xla (overlapping, padded or dilated window)")))
        return
    (x,) = eqn.invars
    if eqn.primitive.name == "reduce_window_sum":
        program.actions[i] = lambda read: [sum_pool(read(x), window)]
        program.choices.append((i, Choice(_layer(eqn), _describe(eqn), "reshape-sum")))
        return
    # A relu right before (its output read only here) or right after folds into the pool.
    before = graph.producer.get(x)
    after = graph.sole_consumer(eqn.outvars[0])
    if (before is not None and before not in program.actions and before not in program.skip
            and graph.sole_consumer(x) == i and _relu_input(graph.eqns[before]) is not None):
        source = _relu_input(graph.eqns[before])
        program.skip.add(before)
        program.actions[i] = lambda read: [max_pool(read(source), window, relu=True)]
        folded = "reshape-max (relu folded in)"
    elif after is not None and _relu_input(graph.eqns[after]) is eqn.outvars[0]:
        program.skip.add(i)
        program.actions[after] = lambda read: [max_pool(read(x), window, relu=True)]
        folded = "reshape-max (relu folded in)"
    else:
        program.actions[i] = lambda read: [max_pool(read(x), window)]
        folded = "reshape-max"
    program.choices.append((i, Choice(_layer(eqn), _describe(eqn), folded)))


def _plan_nested(program: _Program, i: int, table: Policy) -> None:
    """A nested ``jit`` or ``checkpoint`` body with convolutions or pools: planned too."""
    eqn = program.jaxpr.eqns[i]
    inner = eqn.params["jaxpr"]
    closed = inner if hasattr(inner, "consts") else None
    sub = _plan(closed.jaxpr if closed is not None else inner, table)
    program.choices += [(i, choice) for _, choice in sub.choices]
    if not sub.actions:
        return
    consts = closed.consts if closed is not None else ()
    if eqn.primitive.name in _JIT:
        program.actions[i] = lambda read: _run(sub, consts, [read(v) for v in eqn.invars])
        return
    params = eqn.params

    def remat(read):
        body = jax.checkpoint(lambda *a: _run(sub, consts, a),
                              prevent_cse=params.get("prevent_cse", True),
                              policy=params.get("policy"))
        return body(*[read(v) for v in eqn.invars])

    program.actions[i] = remat


# --------------------------------------------------------------------------- reporting


def _subjaxprs(eqn) -> Iterable[Any]:
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jex.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex.Jaxpr):
                yield item


def _target_eqns(jaxpr) -> list[Any]:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _TARGETS:
            found.append(eqn)
        found += _target_eqns_of(eqn)
    return found


def _target_eqns_of(eqn) -> list[Any]:
    return [e for sub in _subjaxprs(eqn) for e in _target_eqns(sub)]


def _contains_targets(eqn) -> bool:
    return bool(_target_eqns_of(eqn))


def _layer(eqn) -> str:
    return str(eqn.source_info.name_stack)


def _describe(eqn) -> str:
    p = eqn.params
    if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval for v in eqn.invars)
        strides = "x".join(map(str, p["window_strides"]))
        padding = ",".join(f"{lo}/{hi}" for lo, hi in p["padding"])
        if eqn.params["dimension_numbers"].rhs_spec == _NHWC_SPECS[1] and rhs.ndim == 4:
            kh, kw, c_in, c_out = rhs.shape
            return (f"conv {kh}x{kw} stride {strides} pad {padding} {c_in}->{c_out} "
                    f"{lhs.dtype}")
        return f"conv {rhs.shape} stride {strides} pad {padding}"
    kind = "max_pool" if eqn.primitive.name == "reduce_window_max" else "sum_pool"
    window = "x".join(map(str, p["window_dimensions"][1:3]))
    stride = "x".join(map(str, p["window_strides"][1:3]))
    return f"{kind} {window} stride {stride}"
