"""The seam for speed: fast formulations of any model's convolutions and pools.

Every step the library runs (``fc.train_step``/``eval_step``/``predict``, ``fc.fit``,
``fc.epochs``, evaluation, populations, ``fc.per_example_grads``, feature maps) calls the
model through :func:`rewrite`. It traces the model's forward pass to a jaxpr once per
compilation and replaces its ``lax.conv_general_dilated`` and ``lax.reduce_window``
equations (``nn.Conv``, ``nn.max_pool``, ``nn.avg_pool``; conv -> relu -> pool chains as one
block) by the formulation that :mod:`~flaxconv.kernels.policy` measured fastest on the
backend, each with its own custom VJP. Everything else (dense layers, BatchNorm, dropout,
the user's own ``custom_vjp`` functions) runs exactly as traced. So it works on any model
written with Flax linen, NNX or plain ``jax.lax``, with no change to the model, and the
parameters, values and gradients are XLA's own to float32 rounding.

>>> fc.kernels.explain(lambda v, x: model.apply(v, x, train=True), variables, images)
>>> state = state.replace(kernels="xla")      # opt out: XLA's own operations
>>> # or FLAXCONV_KERNELS=xla in the environment, read by fc.create_train_state

Layout: :mod:`.conv` (lone convolutions), :mod:`.pool`, :mod:`.blocks` and
:mod:`.winograd` (conv -> relu -> pool blocks), :mod:`.policy` (which runs where),
:mod:`.seam` (the transformation, :func:`rewrite`) with :mod:`.jaxpr_match` (what it
recognizes in a jaxpr). Deleting this package and the one call in
``flaxconv.steps`` leaves every model running on XLA's own operations.
"""

from flaxconv.kernels.blocks import BLOCK_FORMULATIONS, conv_relu_pool
from flaxconv.kernels.conv import CONV_FORMULATIONS, conv2d
from flaxconv.kernels.policy import ENV_VAR, POLICIES, Policy, policy_name, resolve
from flaxconv.kernels.pool import avg_pool, max_pool
from flaxconv.kernels.seam import Choice, explain, rewrite

__all__ = [
    "BLOCK_FORMULATIONS",
    "CONV_FORMULATIONS",
    "ENV_VAR",
    "POLICIES",
    "Choice",
    "Policy",
    "avg_pool",
    "conv2d",
    "conv_relu_pool",
    "explain",
    "max_pool",
    "policy_name",
    "resolve",
    "rewrite",
]
