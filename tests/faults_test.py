"""Fault injection: masked combination matrices, faults inside the train step, a faulty run."""


import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from fixtures import TINY, tiny_data

from drt_jax import algorithms, build, config, data, drt, faults, inputs, topology, train
from drt_jax import combine as combine_lib
from drt_jax.types import Mixing

GRAPHS = (("ring", "ring", 8, {}), ("torus", "torus", 9, {}), ("full", "full", 5, {}),
          ("star", "star", 6, {}), ("erdos_renyi", "erdos_renyi", 10, {"p": 0.5}),
          ("exponential_directed", "exponential", 8, {}),
          ("random_matching_time_varying", "random_matching", 8, {"period": 4}),
          ("grid_uniform_not_symmetric", "grid", 6, {"weights": "uniform"}))


def _patterns(mixing, spec, n):
  """``n`` fault patterns drawn at steps 0 .. n-1, as numpy arrays."""
  draw = jax.jit(jax.vmap(lambda step: faults.sample(faults.stream_key(spec.seed), step, mixing,
                                                     spec)))
  return jax.device_get(draw(jnp.arange(n)))


class MaskedMatrixTest(parameterized.TestCase):

  @parameterized.named_parameters(*GRAPHS)
  def test_masked_matrices_keep_the_invariants(self, kind, k_count, options):
    topo = topology.make(kind, k_count, seed=1, **options)
    spec = faults.Spec(agent_dropout=0.25, link_failure=0.3, seed=3)
    seen_dropped = seen_failed = 0
    for t in range(topo.period):
      base = topo.mixing(t)
      a = topo.dense(t)
      pats = _patterns(base, spec, 48)
      for i in range(48):
        alive, link_ok = pats.alive[i], pats.link_ok[i]
        m = topology.to_dense(np.asarray(base.nbr_idx), np.asarray(pats.mixing.nbr_w[i]))
        self.assertGreaterEqual(m.min(), 0.0)
        np.testing.assert_allclose(m.sum(axis=0), 1.0, atol=1e-6)
        self.assertTrue(np.all((m > 0) <= ((a > 0) | np.eye(k_count, dtype=bool))))
        if topo.symmetric:
          np.testing.assert_allclose(m, m.T, atol=1e-7)
        for k in np.flatnonzero(~alive):
          seen_dropped += 1
          np.testing.assert_array_equal(m[:, k], np.eye(k_count)[k])  # column: identity
          self.assertEqual(np.count_nonzero(np.delete(m[k], k)), 0)  # row: zero off-diagonal
        # A failed listed link carries no weight, in both directions where both exist.
        nbr = np.asarray(base.nbr_idx)
        for k, j in zip(*np.nonzero(~link_ok & (np.asarray(base.nbr_w) > 0))):
          l = nbr[k, j]
          seen_failed += 1
          self.assertEqual(m[l, k], 0.0)
          if a[k, l] > 0:
            self.assertEqual(m[k, l], 0.0)
        # Links between live agents that did not fail keep their base weight.
        keep = alive[:, None] & alive[nbr] & link_ok
        keep[:, 0] = False
        np.testing.assert_array_equal(np.where(keep, pats.mixing.nbr_w[i], 0.0),
                                      np.where(keep, np.asarray(base.nbr_w), 0.0))
    self.assertGreater(seen_dropped, 0)
    self.assertGreater(seen_failed, 0)

  def test_links_fail_in_both_directions_together(self):
    topo = topology.make("torus", 16)
    base = topo.mixing()
    pats = _patterns(base, faults.Spec(link_failure=0.5, seed=0), 32)
    ids = np.asarray(faults.pair_ids(base.nbr_idx))
    for link_ok in pats.link_ok:
      for pair in np.unique(ids[:, 1:]):
        self.assertEqual(len(set(link_ok[ids == pair].tolist())), 1)
      self.assertTrue(np.all(link_ok[:, 0]))

  def test_counts(self):
    ring = topology.make("ring", 6).mixing()
    alive = jnp.array([True, False, True, True, True, True])
    link_ok = jnp.ones((6, 3), bool)
    # Agent 3 listens to 2 and 4 (slots 1, 2 in some order); fail the link {3, 4} both ways.
    nbr = np.asarray(ring.nbr_idx)
    fail = np.zeros((6, 3), bool)
    fail[3, list(nbr[3]).index(4)] = fail[4, list(nbr[4]).index(3)] = True
    f = faults.Faults(alive, alive, link_ok & ~fail, faults.mask_mixing(ring, alive,
                                                                         link_ok & ~fail))
    got = jax.device_get(faults.counts(f, ring))
    self.assertEqual(got, {"dropped_agents": 1.0, "failed_links": 1.0, "stragglers": 0.0})

  def test_fault_keys_share_nothing_with_the_run_keys(self):
    # Fault seed and run seed are both 0 by default: the fault stream must still be its own.
    data = lambda k: tuple(np.asarray(jax.random.key_data(k)).ravel())  # noqa: E731
    root = jax.random.key(0)
    run_keys = {data(root), *(data(jax.random.fold_in(root, i)) for i in range(8))}
    fault_root = faults.stream_key(0)
    fault_keys = {data(fault_root), *(data(jax.random.fold_in(fault_root, s)) for s in range(8))}
    self.assertEmpty(run_keys & fault_keys)

  @parameterized.parameters(*drt.VARIANTS)
  def test_drt_gives_dropped_agents_and_failed_links_zero_weight(self, variant):
    topo = topology.make("ring", 8)
    base = topo.mixing()
    params = {"a": {"w": jax.random.normal(jax.random.key(0), (8, 5, 3))},
              "b": {"w": jax.random.normal(jax.random.key(1), (8, 4))}}
    names = combine_lib.layer_names(params)
    gamma = {p: 1.0 for p in combine_lib.unique_layers(names)}
    pats = _patterns(base, faults.Spec(agent_dropout=0.25, link_failure=0.25, seed=5), 16)
    for i in range(16):
      masked = Mixing(base.nbr_idx, jnp.asarray(pats.mixing.nbr_w[i]))
      layer_w, _ = drt.weights(params, masked, names, gamma, variant=variant)
      masked_dense = topology.to_dense(np.asarray(base.nbr_idx), np.asarray(masked.nbr_w))
      for w in layer_w.values():
        m = topology.to_dense(np.asarray(base.nbr_idx), np.asarray(w, np.float64))
        self.assertGreaterEqual(m.min(), 0.0)
        np.testing.assert_allclose(m.sum(axis=0), 1.0, atol=1e-6)
        off = ~np.eye(8, dtype=bool)
        self.assertTrue(np.all(m[off & (masked_dense == 0)] == 0.0))  # nothing where masked
        for k in np.flatnonzero(~pats.alive[i]):
          np.testing.assert_array_equal(m[:, k], np.eye(8)[k])
        if variant == "drt_symmetric":
          np.testing.assert_allclose(m, m.T, atol=1e-6)


def _programs(c, d):
  c = config.resolve(c)
  model = build.model(c, d)
  alg = build.algorithm(c)
  topo = build.topology(c)
  dev = inputs.device_data(d, data.partition_iid(len(d.train_labels), c.num_agents))
  return c, build.programs(c, model, alg), build.init_state(c, model, alg, topo), topo, dev


def _pattern_at(c, state, topo):
  spec = faults.spec_from_config(c)
  base = combine_lib.as_mixing(topo, state.alg_state.count)
  return jax.device_get(faults.sample(faults.stream_key(spec.seed), state.step, base, spec))


def _agent(tree, k):
  return [np.asarray(x[k]) for x in jax.tree.leaves(tree)]


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(a, b))


class FaultyStepTest(parameterized.TestCase):

  @parameterized.parameters(*algorithms.NAMES)
  def test_a_dropped_agent_keeps_its_params_and_optimizer_state(self, name):
    c = {**TINY, "num_agents": 8, "algorithm": name, "model_options": {"hidden": (8,)},
         "faults": {"agent_dropout": 0.4, "seed": 1}}
    c, progs, state, topo, dev = _programs(c, tiny_data())
    dropped_seen = alive_seen = 0
    for _ in range(4):
      pat = _pattern_at(c, state, topo)
      before = jax.device_get((state.params, state.alg_state.opt_state))
      state, m = progs.train_step(state, topo, dev)
      after = jax.device_get((state.params, state.alg_state.opt_state))
      self.assertEqual(float(m["dropped_agents"]), float(np.sum(~pat.alive)))
      for k in range(8):
        unchanged = _same(_agent(before, k), _agent(after, k))
        self.assertEqual(unchanged, not pat.alive[k], f"agent {k}")
        dropped_seen += not pat.alive[k]
        alive_seen += bool(pat.alive[k])
    self.assertGreater(dropped_seen, 0)
    self.assertGreater(alive_seen, 0)

  def test_a_straggler_skips_its_local_step_but_communicates(self):
    c = {**TINY, "num_agents": 8, "algorithm": "atc", "model_options": {"hidden": (8,)},
         "faults": {"straggler": 0.5, "seed": 2}}
    c, progs, state, topo, dev = _programs(c, tiny_data())
    state, _ = progs.train_step(state, topo, dev)  # agents drift apart: combining changes them
    pat = _pattern_at(c, state, topo)
    self.assertTrue(np.any(~pat.active) and np.any(pat.active))
    before = jax.device_get((state.params, state.alg_state.opt_state))
    new, m = progs.train_step(state, topo, dev)
    self.assertEqual(float(m["stragglers"]), float(np.sum(~pat.active)))
    after_params, after_opt = jax.device_get((new.params, new.alg_state.opt_state))
    mixed = jax.device_get(combine_lib.combine(before[0], topo))
    for k in range(8):
      self.assertEqual(_same(_agent(before[1], k), _agent(after_opt, k)), not pat.active[k])
      self.assertFalse(_same(_agent(before[0], k), _agent(after_params, k)))  # combined
    # A straggler whose neighbours straggle too ends at the plain combination of the old params.
    for k in range(8):
      nbrs = np.asarray(topo.nbr_idx[0, k])
      if not np.any(pat.active[nbrs]):
        for x, y in zip(_agent(mixed, k), _agent(after_params, k)):
          np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)

  def test_the_fault_free_program_holds_no_fault_code(self):
    def lowered(faults_cfg):
      c, progs, state, topo, dev = _programs({**TINY, "faults": faults_cfg}, tiny_data())
      return progs.train_step.lower(state, topo, dev).as_text(), c

    clean, c0 = lowered({})
    reseeded, c1 = lowered({"seed": 7})
    faulty, c2 = lowered({"link_failure": 0.1})
    self.assertEqual(clean, reseeded)
    self.assertNotEqual(clean, faulty)
    self.assertEqual(build.step_spec(c0), build.step_spec(c1))
    self.assertNotEqual(build.step_spec(c0), build.step_spec(c2))


class FaultyRunTest(absltest.TestCase):

  def test_a_ring_with_dropouts_and_link_failures_trains(self):
    c = {**TINY, "num_agents": 8, "algorithm": "drt", "num_steps": 20, "eval_every": 10,
         "faults": {"agent_dropout": 0.2, "link_failure": 0.1, "seed": 0}}
    history = train.train_and_evaluate(c, data=tiny_data())
    self.assertEqual([r["step"] for r in history], [0, 10, 20])
    last = history[-1]
    self.assertTrue(np.isfinite(last["train_loss"]))
    self.assertBetween(last["dropped_agents"], 0.3, 4.0)  # about 0.2 * 8 per step
    self.assertBetween(last["failed_links"], 0.0, 2.5)  # about 0.1 * 8 edges of live agents
    self.assertEqual(last["stragglers"], 0.0)
    self.assertIsNone(history[0]["dropped_agents"])  # no step before the first evaluation


if __name__ == "__main__":
  absltest.main()
