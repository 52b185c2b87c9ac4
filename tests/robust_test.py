"""Robust combination rules: definitions against numpy, Byzantine least squares, options, shard."""

import dataclasses
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from jax.sharding import NamedSharding, PartitionSpec

from drt_jax import backends, combine, faults, robust, topology
from drt_jax.algorithms import diffusion
from drt_jax.types import Mixing

# Hand-made neighbour lists, K = 5, D = 4 (slot 0 = self). Agent 0 listens to 1, 2, 3; agent 1
# to 0 and 2 with a padding slot; agent 2 to 1, with a failed link to 3 (listed, weight 0) and a
# padding slot; agent 3 to 0, 2, 4; agent 4 to nobody (all padding).
_IDX = np.array([[0, 1, 2, 3], [1, 0, 2, 1], [2, 1, 3, 2], [3, 0, 2, 4], [4, 4, 4, 4]], np.int32)
_W = np.array([[0.4, 0.2, 0.2, 0.2], [0.5, 0.25, 0.25, 0.0], [0.7, 0.3, 0.0, 0.0],
               [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]], np.float32)


def _members(k):
  return [k] + [int(l) for l, w in zip(_IDX[k, 1:], _W[k, 1:]) if w > 0]


def _tree(seed=0, k_count=5):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.standard_normal((k_count, 3)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal((k_count, 2, 2)), jnp.float32)}


@jax.jit
def _rules(tree, mixing):
  """Every rule at once: one compile for the definition tests."""
  return {**{f"trim{b}": robust.trimmed_mean(tree, mixing, b) for b in (0, 1, 2)},
          "median": robust.median(tree, mixing),
          "clip": robust.clipped_gossip(tree, mixing, 0.5),
          "clip_wide": robust.clipped_gossip(tree, mixing, 1e6),
          "mean": combine.combine(tree, mixing)}


def _trimmed_ref(vals, b):
  """Coordinate-wise: sort the members' values, drop b at each end, average the rest."""
  s = np.sort(vals, axis=0)
  return s[b:len(s) - b].mean(axis=0)


class DefinitionsTest(parameterized.TestCase):

  def test_trimmed_mean_and_median_against_numpy(self):
    tree = _tree()
    got = jax.device_get(_rules(tree, Mixing(jnp.asarray(_IDX), jnp.asarray(_W))))
    for name, x in tree.items():
      x = np.asarray(x)
      for k in range(5):
        vals = x[_members(k)]
        n = len(vals)
        np.testing.assert_allclose(got["median"][name][k], np.median(vals, axis=0), rtol=1e-6,
                                   atol=1e-6, err_msg=f"median {k}")
        np.testing.assert_allclose(got["trim0"][name][k], vals.mean(axis=0), rtol=1e-6,
                                   atol=1e-6)
        for b in (1, 2):  # b too large for this neighbourhood: the median's b instead
          want = _trimmed_ref(vals, min(b, (n - 1) // 2))
          np.testing.assert_allclose(got[f"trim{b}"][name][k], want, rtol=1e-6, atol=1e-6,
                                     err_msg=f"trim {b}, agent {k} with {n} members")
    # The failed link (agent 2 lists 3 with weight 0) is not in 2's neighbourhood: moving
    # agent 3 far away changes nothing for agent 2.
    far = {n: x.at[3].set(1e3) for n, x in tree.items()}
    moved = jax.device_get(_rules(far, Mixing(jnp.asarray(_IDX), jnp.asarray(_W))))
    for rule in ("median", "trim1", "clip"):
      for name in tree:
        np.testing.assert_array_equal(moved[rule][name][2], got[rule][name][2])
    # An agent alone keeps itself under every rule.
    for rule in ("median", "trim1", "trim0", "clip"):
      for name, x in tree.items():
        np.testing.assert_array_equal(got[rule][name][4], np.asarray(x)[4])

  def test_clipped_gossip_against_numpy(self):
    tree = _tree(1)
    got = jax.device_get(_rules(tree, Mixing(jnp.asarray(_IDX), jnp.asarray(_W))))
    x = {n: np.asarray(v, np.float64) for n, v in tree.items()}
    clipped_seen = 0
    for k in range(5):
      want = {n: v[k].copy() for n, v in x.items()}
      for l, w in zip(_IDX[k, 1:], _W[k, 1:]):
        d = {n: v[l] - v[k] for n, v in x.items()}
        norm = np.sqrt(sum(np.sum(z ** 2) for z in d.values()))  # over both leaves together
        clipped_seen += norm > 0.5 and w > 0
        for n in x:
          want[n] += w * d[n] * min(1.0, 0.5 / norm) if norm > 0 else 0.0
      for n in x:
        np.testing.assert_allclose(got["clip"][n][k], want[n], rtol=1e-5, atol=1e-6)
    self.assertGreater(clipped_seen, 2)
    # A radius beyond every distance is the weighted mean (columns sum to one).
    for n in x:
      np.testing.assert_allclose(got["clip_wide"][n], got["mean"][n], rtol=1e-5, atol=1e-6)

  def test_what_keeps_the_network_average(self):
    # Symmetric doubly stochastic weights: clipped gossip keeps the sum (CLIP is odd), the
    # coordinate-wise rules do not, even without any attacker.
    ring = topology.make("ring", 5)
    tree = _tree(2)
    got = jax.device_get(_rules(tree, ring.mixing()))
    for n, x in tree.items():
      total = np.asarray(x).sum(axis=0)
      np.testing.assert_allclose(got["clip"][n].sum(axis=0), total, atol=1e-5)
      self.assertFalse(np.allclose(got["clip"][n], got["mean"][n], atol=1e-3))  # it did clip
      self.assertGreater(np.abs(got["median"][n].sum(axis=0) - total).max(), 1e-2)
      self.assertGreater(np.abs(got["trim1"][n].sum(axis=0) - total).max(), 1e-2)


class SortingNetworkTest(parameterized.TestCase):
  """The compare-exchange network of the trimmed mean and the median (widths up to
  robust.NETWORK_MAX_WIDTH) and XLA's sort beyond it, against numpy on random neighbour lists."""

  def test_network_sorts_every_zero_one_input(self):
    # The 0-1 principle: a comparator network that sorts every 0/1 input sorts everything.
    for width in range(1, robust.NETWORK_MAX_WIDTH + 1):
      v = (np.arange(2 ** width)[:, None] >> np.arange(width)) & 1  # [2^width, width]
      for i, j in robust.sorting_network(width):
        self.assertLess(i, j)
        v[:, i], v[:, j] = np.minimum(v[:, i], v[:, j]), np.maximum(v[:, i], v[:, j])
      np.testing.assert_array_equal(v, np.sort(v, axis=1), err_msg=f"width {width}")
    self.assertEqual([len(robust.sorting_network(w)) for w in (1, 2, 3, 4, 8, 16)],
                     [0, 1, 3, 5, 19, 63])

  @staticmethod
  def _random_case(width, seed, k_count=9):
    """Neighbour lists with repeated padding slots, zero-weight links and isolated agents;
    values with ties, +-inf and NaN in a few coordinates."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, k_count, (k_count, width)).astype(np.int32)
    idx[:, 0] = np.arange(k_count)
    w = rng.uniform(0.1, 1.0, (k_count, width)).astype(np.float32)
    w[:, 1:] *= rng.random((k_count, width - 1)) > 0.35  # padding, failed links
    w[k_count - 1, 1:] = 0.0  # one agent alone
    w /= w.sum(axis=1, keepdims=True)
    x = rng.standard_normal((k_count, 4, 6)).astype(np.float32)
    x[:, 0] = rng.integers(-2, 3, (k_count, 6))  # ties
    x[:, 1, 0], x[:, 1, 1] = rng.choice([0.5, np.inf, -np.inf], (2, k_count))
    x[:, 1, 2] = np.where(rng.random(k_count) < 0.3, np.nan, x[:, 1, 2])
    return {"x": x}, idx, w

  @staticmethod
  def _reference(x, idx, w, b):
    """Agent k's members (slot 0 and positive weights, by slot), sorted with NaN last, b
    dropped at each end (b None: the median's), the rest averaged."""
    out = np.empty_like(x)
    for k in range(len(x)):
      vals = x[[idx[k, j] for j in range(idx.shape[1]) if j == 0 or w[k, j] > 0]]
      n = len(vals)
      keep = (n - 1) // 2 if b is None else min(b, (n - 1) // 2)
      with np.errstate(invalid="ignore"):
        out[k] = np.sort(vals, axis=0)[keep:n - keep].mean(axis=0)
    return out

  @parameterized.parameters(1, 2, 3, 4, 5, 6)
  def test_trimmed_mean_and_median_against_numpy(self, width):
    def run(tree, mixing, network_max_width):
      def rules(tree, mixing):  # a new function each time: jit's trace cache keeps one path
        return {**{f"trim{b}": robust.trimmed_mean(tree, mixing, b) for b in (0, 1, 2)},
                "median": robust.median(tree, mixing)}

      with mock.patch.object(robust, "NETWORK_MAX_WIDTH", network_max_width):
        sorts = "sort[" in str(jax.make_jaxpr(rules)(tree, mixing))
        self.assertEqual(sorts, width > network_max_width)
        return jax.device_get(jax.jit(rules)(tree, mixing))

    dropped = 0
    for seed in range(3):
      tree, idx, w = self._random_case(width, seed)
      mixing = Mixing(jnp.asarray(idx), jnp.asarray(w))
      got = run(tree, mixing, robust.NETWORK_MAX_WIDTH)
      by_sort = run(tree, mixing, 0)  # XLA's sort, the path of wider neighbourhoods
      for rule in got:
        want = self._reference(tree["x"], idx, w, None if rule == "median" else int(rule[4:]))
        msg = f"width {width}, seed {seed}, {rule}"
        np.testing.assert_allclose(got[rule]["x"], want, rtol=1e-6, atol=1e-6, err_msg=msg)
        np.testing.assert_allclose(by_sort[rule]["x"], want, rtol=1e-6, atol=1e-6, err_msg=msg)
      # The cases are there: a NaN member kept by the mean, and (from 3 slots) dropped.
      nan_member = np.isnan(tree["x"][:, 1, 2])[idx] & ((w > 0) | (np.arange(width) == 0))
      nan_member = nan_member.any(axis=1)
      dropped += int(np.sum(nan_member & np.isfinite(got["median"]["x"][:, 1, 2])))
      self.assertTrue(np.isnan(got["trim0"]["x"][nan_member, 1, 2]).all())
    self.assertEqual(dropped > 0, width >= 3)


class ByzantineLeastSquaresTest(absltest.TestCase):
  """One Byzantine agent on a ring of 8 sends -10 x (sign flip). Honest agent k minimises
  J_k(w) = ||w - c_k||^2 / 2 (gradient w - c_k); the honest optimum is w* = mean of honest c_k.

  Bounds (derived in the test's comments): with zeta = max_k ||c_k - w*|| over honest k,
  R_0 = max_k ||x_k(0) - w*||, the Byzantine weight a = max a_bk <= 1/3 and step mu:
    clipped gossip:           max_k ||x_k - w*||     <= max(R_0, zeta + a tau / mu)
    trimmed mean (b=1)/median: max_k ||x_k - w*||_inf <= max(R_0inf, zeta_inf).
  """

  K, N, MU, STEPS, TAU = 8, 3, 0.2, 150, 0.1
  SPEC = faults.Spec(byzantine=1, attack="sign_flip", attack_scale=10.0, seed=0)

  def _problem(self):
    rng = np.random.default_rng(0)
    c = rng.standard_normal((self.K, self.N)).astype(np.float32)
    byz = faults.byzantine_agents(self.SPEC, self.K)
    self.assertEqual(int(byz.sum()), 1)
    return c, byz, c[~byz].mean(axis=0)

  def _run(self, alg, c):
    topo = topology.make("ring", self.K)
    key = faults.stream_key(self.SPEC.seed)

    @jax.jit
    def run(params):
      def body(t, carry):
        params, state = carry
        mixing = faults.sample(key, t, topo.mixing(t), self.SPEC).mixing  # with the attack
        return alg.step(params, {"w": params["w"] - c}, state, mixing)

      return jax.lax.fori_loop(0, self.STEPS, body, (params, alg.init(params, topo)))[0]

    return np.asarray(run({"w": jnp.zeros((self.K, self.N), jnp.float32)})["w"], np.float64)

  def test_plain_atc_is_carried_away_and_robust_rules_are_not(self):
    c, byz, w_star = self._problem()
    honest = ~byz
    opt = optax.sgd(self.MU)
    # psi_k = (1 - mu) x_k + mu c_k, so max ||psi_k - w*|| <= (1 - mu) R + mu zeta over honest k.
    # Clipped: x_k+ = psi_k + sum_{honest l} a_lk t_l (psi_l - psi_k) + a_bk CLIP(m_b - psi_k):
    # a convex combination of honest psi's plus at most a tau, hence
    # R+ <= (1 - mu) R + mu zeta + a tau <= max(R, zeta + a tau / mu), by induction from R_0.
    zeta = np.linalg.norm(c[honest] - w_star, axis=1).max()
    r_0 = np.linalg.norm(w_star)  # x(0) = 0
    a = 1.0 / 3.0  # metropolis weights on a ring
    clip_bound = max(r_0, zeta + a * self.TAU / self.MU)
    # Median of 3 (or trimmed mean with b = 1) with at most one Byzantine member lies between
    # two honest values per coordinate, so the same induction in the max-norm gives:
    zeta_inf = np.abs(c[honest] - w_star).max()
    box_bound = max(np.abs(w_star).max(), zeta_inf)

    mean = self._run(diffusion.diffusion_atc(opt), c)
    dist_mean = np.linalg.norm(mean[honest] - w_star, axis=1).max()
    self.assertTrue(not np.isfinite(dist_mean) or dist_mean > 1e3 * clip_bound, dist_mean)

    clipped = self._run(diffusion.diffusion_atc(opt, aggregation="clipped",
                                                clip_radius=self.TAU), c)
    dist_clip = np.linalg.norm(clipped[honest] - w_star, axis=1).max()
    self.assertLessEqual(dist_clip, clip_bound + 1e-4)
    for rule in ("trimmed_mean", "median"):
      out = self._run(diffusion.diffusion_atc(opt, aggregation=rule, trim=1), c)
      self.assertLessEqual(np.abs(out[honest] - w_star).max(), box_bound + 1e-4, rule)
    # For the report: the distances measured.
    print(f"honest max distance to w*: mean {dist_mean:.3g}, clipped {dist_clip:.3f} "
          f"(bound {clip_bound:.3f}), box bound {box_bound:.3f}")


class OptionsTest(parameterized.TestCase):

  @parameterized.parameters(("aggregation", "krum"), ("clip_radius", 0.0),
                            ("clip_radius", float("inf")), ("trim", -1), ("trim", True),
                            ("trim", 1.5))
  def test_bad_options_are_named(self, option, value):
    for factory in (diffusion.diffusion_atc, diffusion.diffusion_cta, diffusion.dsgd):
      with self.assertRaisesRegex(ValueError, f"^[^\n]*{option}[^\n]*$"):
        factory(optax.sgd(0.1), **{option: value})

  def test_trim_needs_large_enough_neighbourhoods(self):
    params = _tree(k_count=8)
    ring = topology.make("ring", 8)
    alg = diffusion.diffusion_atc(optax.sgd(0.1), aggregation="trimmed_mean", trim=2)
    with self.assertRaisesRegex(ValueError, r"^atc with aggregation='trimmed_mean' and trim=2 "
                                r"needs .* more than 4 members; agent \d of the ring topology "
                                r"has 3 at step 0"):
      alg.init(params, ring)
    diffusion.diffusion_atc(optax.sgd(0.1), aggregation="trimmed_mean", trim=1).init(params, ring)
    diffusion.diffusion_atc(optax.sgd(0.1), aggregation="median").init(params, ring)

  @parameterized.parameters("atc", "cta", "dsgd", "drt")
  def test_weights_must_sum_to_one_per_agent(self, name):
    ring = topology.make("ring", 8)
    bad = dataclasses.replace(ring, nbr_w=ring.nbr_w * 0.9)
    factory = {"atc": diffusion.diffusion_atc, "cta": diffusion.diffusion_cta,
               "dsgd": diffusion.dsgd, "drt": diffusion.drt_diffusion}[name]
    with self.assertRaisesRegex(ValueError, f"^{name} needs every agent's weights summing"):
      factory(optax.sgd(0.1)).init(_tree(k_count=8), bad)
    diffusion.local(optax.sgd(0.1)).init(_tree(k_count=8), bad)  # local needs nothing

  def test_consensus_is_a_fixed_point_of_every_rule(self):
    one = _tree(3, k_count=1)
    params = jax.tree.map(lambda x: jnp.tile(x, (8,) + (1,) * (x.ndim - 1)), one)
    rules = jax.jit(lambda t, m: {r: robust.aggregator(r, clip_radius=0.1)(t, m)
                                  for r in robust.AGGREGATIONS})
    for rule, out in rules(params, topology.make("torus", 8).mixing()).items():
      for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
        np.testing.assert_allclose(x, y, atol=1e-6, err_msg=rule)

  @parameterized.parameters(("cta", "median"), ("dsgd", "clipped"))
  def test_cta_and_dsgd_combine_with_the_rule(self, kind, rule):
    factory = diffusion.diffusion_cta if kind == "cta" else diffusion.dsgd
    alg = factory(optax.sgd(0.1), aggregation=rule, clip_radius=0.5)
    params, grads = _tree(4, k_count=8), _tree(5, k_count=8)
    torus = topology.make("torus", 8)
    new, state = jax.jit(alg.step)(params, grads, alg.init(params, torus), torus)
    mixed = jax.jit(robust.aggregator(rule, clip_radius=0.5))(params, torus.mixing())
    if kind == "cta":
      self.assertIsNotNone(alg.grad_point)
    want = jax.tree.map(lambda m, g: m - 0.1 * g, mixed, grads)  # both: mixed params - mu g
    for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    plain = jax.jit(combine.combine)(params, torus)
    self.assertFalse(np.allclose(jax.tree.leaves(mixed)[0], jax.tree.leaves(plain)[0], atol=1e-3))
    self.assertEqual(int(state.count), 1)


def _collectives(hlo: str) -> dict:
  out = {}
  for op in ("all-gather", "collective-permute", "all-reduce"):
    out[op] = re.findall(r"= (\w+\[[\d,]*\])[^=]*? " + op + r"(?:-start)?\(", hlo)
  return out


class ShardTest(absltest.TestCase):
  """On 8 virtual devices (conftest.py) the attacked combine and the robust rules equal the
  single-device results and exchange neighbours by collective-permute, not all-gather."""

  def test_attack_and_rules_on_the_agents_mesh(self):
    if jax.local_device_count() < 8:
      self.skipTest("needs 8 local devices")
    k_count = 8
    ring = topology.make("ring", k_count)
    self.assertIsNotNone(ring.shifts)
    spec = faults.Spec(byzantine=2, attack="sign_flip", attack_scale=3.0, seed=1)
    mixing = faults.sample(faults.stream_key(1), 0, ring.mixing(), spec).mixing
    tree = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((k_count, 40, 25)),
                             jnp.float32)}

    def all_rules(t, m):
      return {"mean": combine.combine(t, m), "clip": robust.clipped_gossip(t, m, 1.0),
              "trim": robust.trimmed_mean(t, m, 1), "median": robust.median(t, m)}

    split = NamedSharding(backends.agents_mesh(k_count), PartitionSpec(backends.AGENTS))
    fn = jax.jit(all_rules, out_shardings=split)
    sharded = jax.device_put(tree, split)
    hlo = fn.lower(sharded, mixing).compile().as_text()
    ops = _collectives(hlo)
    self.assertNotEmpty(ops["collective-permute"])
    big = [s for s in ops["all-gather"] if "40,25" in s]
    self.assertEmpty(big, f"parameters all-gathered: {big}")
    got = backends.to_host(fn(sharded, mixing))
    want = jax.device_get(jax.jit(all_rules)(tree, mixing))
    for name in want:
      np.testing.assert_allclose(got[name]["w"], want[name]["w"], rtol=1e-5, atol=1e-5)
    # The attack is there: the mean differs from the honest combine.
    honest = np.asarray(combine.combine(tree, ring)["w"])
    self.assertGreater(np.abs(want["mean"]["w"] - honest).max(), 0.1)


if __name__ == "__main__":
  absltest.main()
