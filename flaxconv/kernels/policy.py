"""Which formulation runs where: the measured choice per backend, in one table.

A :class:`Policy` answers, for one layer of a traced model, which formulation of
:mod:`flaxconv.kernels` computes it. The numbers behind each entry are in
``benchmarks/RESULTS.md`` §0 (``benchmarks/conv_shapes.py``, ``conv_impl.py`` and ``zoo.py``
rerun them):

* **CPU.** A conv -> bias -> relu -> 2x2 max-pool block with a 3x3 kernel and several
  input channels runs as Winograd's F(2x2, 3x3), and so does a lone 3x3 convolution with at
  least :data:`WINOGRAD_MIN_CHANNELS` input channels on a map of at least
  :data:`WINOGRAD_MIN_OUTPUT` positions. Other stride-1 convolutions run as
  XLA:CPU's forward NHWC convolution with both gradients written as forward convolutions
  too (``"xla_nhwc"``): since jaxlib 0.11 that beats im2col on every shape measured (by
  1.3-2.2x); in jaxlib 0.10 its default convolution kernels (YNNPACK) lose to im2col's one
  matmul on small output maps (1.5-1.8x at 3x3 and 11x11) and win on larger ones, so there
  a map of at most :data:`JAXLIB_0_10_IM2COL_MAX_OUTPUT` positions runs as ``"im2col"``.
  A first layer with few input channels runs as one patches matmul either way. Strided
  convolutions are ``"im2col"`` (few patches, one matmul).
  JAX's own convolution gradients are never used: XLA:CPU runs them as a naive loop inside
  ``lax.scan`` (jax-ml/jax#12868), 20-60x slower.
* **GPU.** im2col, which beat cuDNN on these small convolutions on an H200; Winograd was
  not measured there.
* **TPU and anything else**: XLA's own operations (the MXU runs convolutions natively).

Pools with window = stride and no padding (and a relu before or after them) run as a
reshape and a reduction on CPU and GPU; every other pool keeps XLA's ``reduce_window``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import jaxlib

from flaxconv.kernels.blocks import winograd_applies
from flaxconv.kernels.conv import few_input_channels, nhwc_applies
from flaxconv.kernels.winograd import winograd_conv_applies

#: The names a policy goes by: ``"auto"`` picks per backend, ``"xla"`` opts out (XLA's
#: own operations everywhere), ``"cpu"``/``"gpu"`` force a backend's table, and
#: ``"im2col"`` runs every convolution as im2col: vmapped models with a kernel each (the
#: populations) then run batched matmuls, where XLA's convolutions would be grouped ones.
POLICIES = ("auto", "xla", "cpu", "gpu", "im2col")

#: The environment variable that sets the default policy (e.g. ``FLAXCONV_KERNELS=xla``).
ENV_VAR = "FLAXCONV_KERNELS"


def jaxlib_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed jaxlib."""
    parts = [int(p) for p in jaxlib.__version__.split(".")[:2] if p.isdigit()]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One convolution as the rewrite sees it: NHWC/HWIO, no dilation, no groups."""

    kernel_shape: tuple[int, int, int, int]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dtype: jnp.dtype
    output_size: tuple[int, int] = (1, 1)  # (H_out, W_out)
    precision: str | None = None  # flaxconv.kernels.precision: None (default), high, highest


#: On jaxlib 0.10's CPU, the largest output map (H_out * W_out) that runs as im2col: its
#: one matmul beat XLA's convolution kernels up to 11x11 and lost from 14x14 on
#: (``benchmarks/RESULTS.md``, the formulations table).
JAXLIB_0_10_IM2COL_MAX_OUTPUT = 128

#: On CPU (jaxlib 0.10 and 0.12 alike), a lone 3x3 stride-1 convolution runs as Winograd
#: F(2x2, 3x3) from this many input channels and this many output positions on: it beat
#: ``xla_nhwc``/im2col by 1.3-1.6x at 14x14 32->64 and 16x16 32->32, lost at 32x32 16->16
#: (the 4x larger transformed input costs more than the 4/9 multiply-adds save at 16
#: channels) and on a 3x3 map (padded to 4x4). ``benchmarks/RESULTS.md`` §0.
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_MIN_OUTPUT = 64


@dataclasses.dataclass(frozen=True)
class Policy:
    """The formulation table of one backend.

    Attributes:
      name: ``"cpu"``, ``"gpu"`` or ``"xla"``.
      rewrite: False: the traced function runs as written (XLA's own operations).
      nhwc_min_output: stride-1 convolutions whose output map has more than this many
        positions run as ``"xla_nhwc"``, the others as ``"im2col"``; None: all im2col.
      winograd: conv -> relu -> 2x2-pool blocks run as Winograd where it applies, and a
        first layer's convolution as its patches matmul (``"xla_nhwc"``'s few-channel case).
      winograd_min_channels: lone 3x3 stride-1 float32 convolutions with at least this many
        input channels and an output map of at least ``winograd_min_output`` positions run
        as ``"winograd"``; None: never.
      winograd_min_output: see ``winograd_min_channels``.
    """

    name: str
    rewrite: bool = True
    nhwc_min_output: int | None = None
    winograd: bool = False
    winograd_min_channels: int | None = None
    winograd_min_output: int = 0

    def conv(self, spec: ConvSpec) -> str:
        """The formulation of a lone convolution: ``"winograd"``, ``"xla_nhwc"`` or
        ``"im2col"``."""
        if not nhwc_applies(spec.kernel_shape, spec.strides, spec.padding):
            return "im2col"
        if few_input_channels(spec.kernel_shape) and self.winograd:
            return "xla_nhwc"
        if (self.winograd_min_channels is not None
                and spec.kernel_shape[2] >= self.winograd_min_channels
                and spec.output_size[0] * spec.output_size[1] >= self.winograd_min_output
                and winograd_conv_applies(spec.kernel_shape, spec.strides, spec.padding,
                                          spec.dtype)):
            return "winograd"
        positions = spec.output_size[0] * spec.output_size[1]
        if self.nhwc_min_output is not None and positions > self.nhwc_min_output:
            return "xla_nhwc"
        return "im2col"

    def block(self, spec: ConvSpec, window: int) -> str:
        """The formulation of a conv -> relu -> max-pool block (``spec`` has stride 1):
        ``"winograd"``, ``"fused"`` (the convolution as ``"xla_nhwc"``, one VJP with the
        pool) or ``"unfused"``."""
        if self.winograd and winograd_applies(spec.kernel_shape, window, spec.dtype):
            return "winograd"
        return "fused" if self.conv(spec) == "xla_nhwc" else "unfused"


XLA = Policy("xla", rewrite=False)
GPU = Policy("gpu")
IM2COL = Policy("im2col")


def cpu_policy(version: tuple[int, int] | None = None) -> Policy:
    """The CPU table for a jaxlib ``(major, minor)`` (default: the installed one)."""
    version = version or jaxlib_version()
    threshold = 0 if version >= (0, 11) else JAXLIB_0_10_IM2COL_MAX_OUTPUT
    return Policy("cpu", nhwc_min_output=threshold, winograd=True,
                  winograd_min_channels=WINOGRAD_MIN_CHANNELS,
                  winograd_min_output=WINOGRAD_MIN_OUTPUT)


_BY_BACKEND = {"cpu": cpu_policy, "gpu": lambda: GPU, "cuda": lambda: GPU, "rocm": lambda: GPU,
               "im2col": lambda: IM2COL}


def policy_name(policy: str | None = None) -> str:
    """``policy`` checked to be one of :data:`POLICIES`; None reads :data:`ENV_VAR`
    (default ``"auto"``).

    Raises:
      ValueError: an unknown name, naming it (and the variable it came from) and the valid
        ones.
    """
    name = os.environ.get(ENV_VAR, "auto") if policy is None else policy
    if name not in POLICIES:
        source = f"{ENV_VAR}={name!r}" if policy is None else f"kernels={name!r}"
        raise ValueError(f"{source}; expected one of {POLICIES}")
    return name


def resolve(policy: str | None = None, backend: str | None = None) -> Policy:
    """The :class:`Policy` called ``policy`` (see :func:`policy_name`); ``"auto"`` picks
    the table of ``backend`` (default ``jax.default_backend()``, read when a step is
    traced).

    Raises:
      ValueError: an unknown name, naming it and the valid ones.
    """
    name = policy_name(policy)
    if name == "xla":
        return XLA
    if name == "auto":
        name = backend or jax.default_backend()
    return _BY_BACKEND.get(name, lambda: XLA)()
