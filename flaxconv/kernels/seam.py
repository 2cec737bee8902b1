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
  or batch groups, a floating dtype and a ``lax.Precision`` (default, high or highest,
  which the formulation then computes at, :mod:`flaxconv.kernels.precision`): any stride,
  padding and kernel size, with or without bias. Others (grouped, dilated, NCHW, two
  different operand precisions, dot-algorithm presets, ...) keep XLA's.
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

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jex

from flaxconv.kernels.blocks import conv_relu_pool
from flaxconv.kernels.conv import conv2d
from flaxconv.kernels.jaxpr_match import (
    JIT,
    REMAT,
    Graph,
    contains_targets,
    conv_spec,
    describe,
    layer_name,
    match_block,
    pool_window,
    relu_input,
    target_eqns,
    target_eqns_of,
)
from flaxconv.kernels.policy import Policy, resolve
from flaxconv.kernels.pool import max_pool, sum_pool


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
        return [Choice(layer_name(e), describe(e), "xla (kernels='xla')")
                for e in target_eqns(closed.jaxpr)]
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
    graph = Graph(jaxpr)
    for i, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            _plan_conv(program, graph, i, table)
        elif name in JIT + REMAT and contains_targets(eqn):
            _plan_nested(program, i, table)
        elif contains_targets(eqn):
            program.choices += [
                (i, Choice(layer_name(e), describe(e), f"xla (inside {name})"))
                for e in target_eqns_of(eqn)
            ]
    for i, eqn in enumerate(jaxpr.eqns):
        if i in program.skip or i in program.actions:
            continue
        if eqn.primitive.name in ("reduce_window_max", "reduce_window_sum"):
            _plan_pool(program, graph, i)
    program.choices.sort(key=lambda pair: pair[0])  # trace order
    return program


def _plan_conv(program: _Program, graph: Graph, i: int, table: Policy) -> None:
    eqn = graph.eqns[i]
    spec, reason = conv_spec(eqn)
    if spec is None:
        program.choices.append((i, Choice(layer_name(eqn), describe(eqn), f"xla ({reason})")))
        return
    block = match_block(graph, i, spec) if spec.strides == (1, 1) else None
    if block is not None:
        chain, tail, bias, window = block
        formulation = table.block(spec, window)
        conv_formulation = table.conv(spec)
        x, kernel = eqn.invars

        def action(read, x=x, kernel=kernel, bias=bias, window=window):
            return [conv_relu_pool(read(x), read(kernel),
                                   None if bias is None else read(bias).reshape(-1),
                                   spec.padding, window, formulation, conv_formulation,
                                   spec.precision)]

        program.actions[tail] = action
        program.skip.update(chain)
        extras = ("+ bias, " if bias is not None else "") + f"relu, max_pool {window}x{window}"
        detail = formulation if formulation != "unfused" else f"{conv_formulation}, unfused"
        program.choices.append(
            (i, Choice(layer_name(eqn), describe(eqn), f"{detail} ({extras})")))
        return
    formulation = table.conv(spec)

    def conv_action(read, eqn=eqn):
        x, kernel = map(read, eqn.invars)
        return [conv2d(x, kernel, spec.strides, spec.padding, formulation, spec.precision)]

    program.actions[i] = conv_action
    program.choices.append((i, Choice(layer_name(eqn), describe(eqn), formulation)))


def _plan_pool(program: _Program, graph: Graph, i: int) -> None:
    eqn = graph.eqns[i]
    window = pool_window(eqn)
    if window is None:
        program.choices.append((i, Choice(layer_name(eqn), describe(eqn),
                                          "xla (overlapping, padded or dilated window)")))
        return
    (x,) = eqn.invars
    if eqn.primitive.name == "reduce_window_sum":
        program.actions[i] = lambda read: [sum_pool(read(x), window)]
        program.choices.append((i, Choice(layer_name(eqn), describe(eqn), "reshape-sum")))
        return
    # A relu right before (its output read only here) or right after folds into the pool.
    before = graph.producer.get(x)
    after = graph.sole_consumer(eqn.outvars[0])
    if (before is not None and before not in program.actions and before not in program.skip
            and graph.sole_consumer(x) == i and relu_input(graph.eqns[before]) is not None):
        source = relu_input(graph.eqns[before])
        program.skip.add(before)
        program.actions[i] = lambda read: [max_pool(read(source), window, relu=True)]
        folded = "reshape-max (relu folded in)"
    elif after is not None and relu_input(graph.eqns[after]) is eqn.outvars[0]:
        program.skip.add(i)
        program.actions[after] = lambda read: [max_pool(read(x), window, relu=True)]
        folded = "reshape-max (relu folded in)"
    else:
        program.actions[i] = lambda read: [max_pool(read(x), window)]
        folded = "reshape-max"
    program.choices.append((i, Choice(layer_name(eqn), describe(eqn), folded)))


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
    if eqn.primitive.name in JIT:
        program.actions[i] = lambda read: _run(sub, consts, [read(v) for v in eqn.invars])
        return
    params = eqn.params

    def remat(read):
        body = jax.checkpoint(lambda *a: _run(sub, consts, a),
                              prevent_cse=params.get("prevent_cse", True),
                              policy=params.get("policy"))
        return body(*[read(v) for v in eqn.invars])

    program.actions[i] = remat
