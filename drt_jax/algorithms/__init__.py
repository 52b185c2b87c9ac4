r"""Decentralized learning algorithms as optax-shaped factories.

Each factory takes a local optimizer (any ``optax.GradientTransformation``, applied per agent with
its state kept local) and returns an :class:`Algorithm` of pure functions over stacked trees:

* ``init(params, topology=None) -> state``: pass the topology where the state is used under jit,
  so that its shapes (DRT keeps the last ``[K, D]`` weights per layer) are fixed from the start
* ``step(params, grads, state, topology, active=None) -> (params, state)``: one iteration for all
  K agents, with ``grads`` evaluated at ``grad_point(params, state, topology)`` (identity unless an
  algorithm says otherwise, as CTA does); the trainer honours the hook. ``active`` (bool ``[K]``,
  default all) names the agents that take their local step: the others keep their parameters and
  optimizer state through the adapt part and only combine (stragglers and dropped agents of
  :mod:`drt_jax.faults`).
* ``combine_stats(stats, state, topology) -> stats``: combines non-trained per-agent state
  (BatchNorm statistics) with the matrices the last step used; the trainer calls it when
  statistics are shared.
* ``metrics(params, state, topology) -> dict``: the algorithm's own diagnostics of the last step
  (scalars: self-weights, DRT statistics), evaluated by the trainer with the other metrics.
* ``message_bytes(nbytes) -> float``: the bytes an agent sends each out-neighbour per step on
  average, given the bytes of one agent's shared variables (``comm_every`` and compression
  included; 0 for an algorithm that never communicates).

Only ``init`` and ``step`` are required: the trainer takes any object with those two (a user's
own NamedTuple, say) and treats a missing ``grad_point``, ``metrics`` or ``message_bytes`` as
"gradients at the parameters", "no diagnostics" and "the parameters every step".

Recursions (``-mu g`` stands for one step of the local optimizer, ``c_lk`` the topology's weights;
see :mod:`drt_jax.types`). What each needs of the weights is checked by its ``init`` in one line
(:func:`drt_jax.algorithms.base.require_weights`):

========================= ====================================================================
``atc``                   psi_k = w_k - mu g_k(w_k);            w_k <- sum_l c_lk psi_l
``cta``                   phi_k = sum_l c_lk w_l;               w_k <- phi_k - mu g_k(phi_k)
``dsgd``                  w_k <- sum_l c_lk w_l - mu g_k(w_k)   (Lian et al. 2017, arXiv
                          1705.09056)
``local``                 w_k <- w_k - mu g_k(w_k)              (no communication)
``drt*``                  psi_k as in ATC; w_k^(p) <- sum_l a_lk^(p) psi_l^(p) with per-layer,
                          per-step weights from :mod:`drt_jax.drt`
``gradient_tracking``     v_k <- sum_l c_lk (v_l + g_l(w_l) - g_l^prev); psi_k = w_k - mu v_k;
                          w_k <- sum_l c_lk psi_l (ATC form of DIGing / NEXT; Nedic, Olshevsky &
                          Shi 2017, arXiv 1607.03218); ``form='dsgt'``: the local step follows
                          the uncombined v_prev + g - g_prev, then one combine of both (Pu &
                          Nedic 2018, arXiv 1805.11454); doubly stochastic weights
``exact_diffusion``       psi_k = w_k - mu g_k(w_k); phi_k = psi_k + w_k - psi_k^prev;
                          w_k <- sum_l cbar_lk phi_l, Cbar = (I + C) / 2 (Yuan, Ying, Zhao &
                          Sayed 2019, arXiv 1702.05122); symmetric weights
``drt_gradient_tracking`` gradient tracking (DSGT form) whose two combines use this step's
                          per-layer symmetric DRT weights A_i^(p) (derived: see :mod:`drt_jax.drt`)
``drt_exact_diffusion``   exact diffusion with (I + A_i^(p)) / 2, A_i^(p) the symmetric DRT
                          weights computed on phi (derived: see :mod:`drt_jax.drt`)
``choco``                 x_half_k = w_k - mu g_k; q_k = Q(x_half_k - xhat_k); xhat_k += q_k;
                          w_k <- x_half_k + gamma sum_l c_lk (xhat_l - xhat_k) (CHOCO-SGD,
                          Koloskova, Stich & Jaggi 2019, arXiv 1902.00340); compressors of
                          :mod:`drt_jax.compression`; doubly stochastic weights
``push_sum``              z_k = x_k / y_k; x_k <- sum_l a_lk (x_l - mu g_l(z_l)),
                          y_k <- sum_l a_lk y_l (stochastic gradient push, Assran et al. 2019,
                          arXiv 1811.10792); weights whose rows sum to one (``weights='push'``)
========================= ====================================================================

The consensus-averaging algorithms (``atc``, ``cta``, ``dsgd``, ``drt``, ``drt_symmetric``,
``drt_normalized``) need every agent's
weights to sum to one (columns of C); ATC, CTA and DSGD also take a robust ``aggregation``
(clipped gossip, trimmed mean, median: :mod:`drt_jax.robust`) against Byzantine neighbours
(:mod:`drt_jax.faults`), or ``self_weights``, a static self-weight per layer (the matched control
of DRT diffusion, :mod:`drt_jax.algorithms.diffusion`). DRT diffusion takes two ablations:
``layerwise=False`` (one matrix for the whole model) and ``freeze_after=N`` (the weights of step N
kept from then on).

Per-layer weights are reported by ``metrics`` as ``self_weight/<layer>`` (the mean over agents),
``self_weight_mean`` (their mean weighted by the layers' numbers of parameters) and
``self_weight_layer_mean`` (the plain mean over layers); with one matrix for every layer only
``self_weight_mean``.

With ``comm_every=H`` (where an algorithm takes it) agents combine only on steps 0, H, 2H, ...
and take local steps in between. A time-varying topology is indexed by the step count kept in the
state, so the compiled step never changes.
"""

import inspect

import optax

from drt_jax.algorithms.base import (
  OPTIMIZERS,
  Algorithm,
  DiffusionState,
  DRTState,
  check_comm_every,
  local_optimizer,
)
from drt_jax.algorithms.compressed import ChocoState, choco
from drt_jax.algorithms.diffusion import diffusion_atc, diffusion_cta, drt_diffusion, dsgd, local
from drt_jax.algorithms.push import PushSumState, push_sum
from drt_jax.algorithms.tracking import (
  drt_exact_diffusion,
  drt_gradient_tracking,
  exact_diffusion,
  gradient_tracking,
)

__all__ = ["ALGORITHMS", "NAMES", "OPTIMIZERS", "Algorithm", "DRTState", "DiffusionState",
           "check_comm_every", "diffusion_atc", "diffusion_cta", "drt_diffusion", "dsgd",
           "local", "local_optimizer", "make", "options", "push_sum", "PushSumState", "uses_drt",
           "gradient_tracking", "exact_diffusion", "drt_gradient_tracking", "drt_exact_diffusion",
           "choco", "ChocoState"]


def _drt_variant(variant):
  def factory(local_optimizer, **kw):
    return drt_diffusion(local_optimizer, variant=variant, **kw)

  sig = inspect.signature(drt_diffusion)
  factory.__signature__ = sig.replace(
      parameters=[p for n, p in sig.parameters.items() if n != "variant"])
  factory.__doc__ = f"DRT diffusion, variant ``{variant}`` (see :func:`drt_diffusion`)."
  return factory


ALGORITHMS = {
    "atc": diffusion_atc,
    "cta": diffusion_cta,
    "dsgd": dsgd,
    "local": local,
    "drt": _drt_variant("drt"),
    "drt_symmetric": _drt_variant("drt_symmetric"),
    "drt_normalized": _drt_variant("drt_normalized"),
    "gradient_tracking": gradient_tracking,
    "exact_diffusion": exact_diffusion,
    "drt_gradient_tracking": drt_gradient_tracking,
    "drt_exact_diffusion": drt_exact_diffusion,
    "choco": choco,
    "push_sum": push_sum,
}
NAMES = tuple(ALGORITHMS)


def make(name: str, local_optimizer: optax.GradientTransformation, **kw) -> Algorithm:
  """The algorithm ``name`` (one of :data:`NAMES`) around ``local_optimizer``.

  Example::

    alg = algorithms.make("drt", optax.sgd(0.1), strength=1.0)
    state = alg.init(params)                      # params: stacked, leading axis K
    params, state = alg.step(params, grads, state, topology.make("ring", K))
  """
  if name not in ALGORITHMS:
    raise ValueError(f"unknown algorithm {name!r}; expected one of: {', '.join(NAMES)}")
  if not (callable(getattr(local_optimizer, "init", None))
          and callable(getattr(local_optimizer, "update", None))):
    raise ValueError(f"local_optimizer={local_optimizer!r} is not an optax "
                     "GradientTransformation; pass one, e.g. optax.sgd(0.1)")
  unknown = sorted(set(kw) - set(options(name)))
  if unknown:
    raise ValueError(f"algorithm {name!r} takes no option {unknown[0]!r}; its options: "
                     f"{', '.join(options(name)) or 'none'}")
  return ALGORITHMS[name](local_optimizer, **kw)


def options(name: str) -> tuple[str, ...]:
  """The keyword options :func:`make` passes to algorithm ``name``."""
  if name not in ALGORITHMS:
    raise ValueError(f"unknown algorithm {name!r}; expected one of: {', '.join(NAMES)}")
  return tuple(n for n in inspect.signature(ALGORITHMS[name]).parameters
               if n != "local_optimizer")


def uses_drt(name: str) -> bool:
  """Whether algorithm ``name`` computes DRT weights (takes the ``config.drt`` fields)."""
  return "strength" in options(name)
