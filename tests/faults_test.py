"""Fault injection: masked combination matrices, faults inside the train step, a faulty run,
Byzantine agents' messages and honest-only metrics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from fixtures import TINY, tiny_data

from drt_jax import (
  algorithms,
  build,
  config,
  data,
  drt,
  faults,
  inputs,
  metrics,
  topology,
  train,
)
from drt_jax import combine as combine_lib
from drt_jax import step as step_lib
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


def _per_agent(tree, k_count):
  return [x for x in jax.tree.leaves(tree) if x.ndim and x.shape[0] == k_count]


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(a, b))


class FaultyStepTest(parameterized.TestCase):

  @parameterized.parameters(*algorithms.NAMES)
  def test_a_dropped_agent_keeps_its_params_and_whole_state(self, name):
    c = {**TINY, "num_agents": 8, "algorithm": name, "model_options": {"hidden": (8,)},
         "faults": {"agent_dropout": 0.4, "seed": 1}}
    c, progs, state, topo, dev = _programs(c, tiny_data())
    dropped_seen = alive_seen = 0
    for _ in range(4):
      pat = _pattern_at(c, state, topo)
      # every per-agent leaf: optimizer state, CHOCO's public copy, trackers, push-sum weights
      before = jax.device_get((state.params, _per_agent(state.alg_state, 8)))
      state, m = progs.train_step(state, topo, dev)
      after = jax.device_get((state.params, _per_agent(state.alg_state, 8)))
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


@functools.partial(jax.jit, static_argnums=(4,))
def _received(x, key, step, mixing, spec_fields):
  """Every slot's copies of ``x`` as the agents receive them, and the combine, at ``step``."""
  m = faults.sample(key, step, mixing, faults.Spec(*spec_fields)).mixing
  copies = [combine_lib.neighbour(x, m, j) for j in range(m.nbr_idx.shape[1])]
  return copies, combine_lib.combine(x, m)



class ByzantineMessagesTest(parameterized.TestCase):

  K, SCALE = 8, 3.0

  def _copies(self, attack, step=0, seed=4, byzantine=2):
    topo = topology.make("exponential", self.K)  # directed, 3 neighbour slots, rolls
    spec = faults.Spec(byzantine=byzantine, attack=attack, attack_scale=self.SCALE, seed=seed)
    x = np.random.default_rng(0).standard_normal((self.K, 50, 4)).astype(np.float32)
    copies, mixed = jax.device_get(_received(jnp.asarray(x), faults.stream_key(seed), step,
                                             topo.mixing(), tuple(spec)))
    return topo, spec, x, copies, mixed

  @parameterized.parameters(*faults.ATTACKS)
  def test_the_attack_replaces_exactly_the_byzantine_senders_copies(self, attack):
    topo, spec, x, copies, mixed = self._copies(attack)
    byz = faults.byzantine_agents(spec, self.K)
    self.assertEqual(int(byz.sum()), 2)
    h = x[~byz].astype(np.float64)
    want = {"sign_flip": -self.SCALE * x, "scale": self.SCALE * x,
            "alie": np.broadcast_to(h.mean(0) - self.SCALE * h.std(0), x.shape)}.get(attack)
    idx, w = topo.nbr_idx[0], topo.nbr_w[0]
    sent = {}
    for k in range(self.K):
      np.testing.assert_array_equal(copies[0][k], x[k])  # an agent's own copy is its own
      for j in range(1, idx.shape[1]):
        l = idx[k, j]
        if not byz[l]:
          np.testing.assert_array_equal(copies[j][k], x[l])
          continue
        if want is not None:
          np.testing.assert_allclose(copies[j][k], want[l], rtol=1e-5, atol=1e-5)
        self.assertFalse(np.allclose(copies[j][k], x[l]))
        if l in sent:  # every out-neighbour receives the same message
          np.testing.assert_array_equal(copies[j][k], sent[l])
        sent[l] = copies[j][k]
    self.assertEqual(set(sent), set(np.flatnonzero(byz)))  # every Byzantine agent is heard
    # The combine uses the received copies, and each agent's own (Byzantine or not) in slot 0.
    expect = sum(w[:, j, None, None] * copies[j] for j in range(idx.shape[1]))
    np.testing.assert_allclose(mixed, expect, rtol=1e-5, atol=1e-5)
    if attack == "gaussian":
      noise = np.stack(list(sent.values()))
      self.assertLess(abs(noise.mean()), 0.5)
      self.assertBetween(noise.std(), 0.85 * self.SCALE, 1.15 * self.SCALE)
      again = self._copies(attack)[3]
      later = self._copies(attack, step=1)[3]
      for j in range(1, idx.shape[1]):
        np.testing.assert_array_equal(again[j], copies[j])  # a pure function of the step
      self.assertFalse(np.allclose(later[1], copies[1]))  # new noise at the next step

  def test_the_byzantine_set_is_seeded_and_fixed_over_steps(self):
    topo = topology.make("ring", 10)
    spec = faults.Spec(byzantine=3, seed=5)
    draw = jax.jit(jax.vmap(lambda step: faults.sample(faults.stream_key(5), step, topo.mixing(),
                                                       spec).mixing.attack.byzantine))
    masks = np.asarray(draw(jnp.arange(6)))
    want = faults.byzantine_agents(spec, 10)
    self.assertEqual(int(want.sum()), 3)
    for mask in masks:
      np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(faults.byzantine_agents(faults.Spec(byzantine=3, seed=5), 10),
                                  want)
    others = {tuple(faults.byzantine_agents(spec._replace(seed=s), 10)) for s in range(6)}
    self.assertGreater(len(others), 1)  # the seed picks the set
    np.testing.assert_array_equal(faults.honest_agents(spec, 10), np.flatnonzero(~want))
    self.assertIsNone(faults.honest_agents(faults.Spec(link_failure=0.5), 10))
    self.assertIsNone(faults.honest_agents(None, 10))

  def test_without_byzantine_agents_nothing_changes(self):
    def spec(**f):
      return faults.spec_from_config(config.resolve({**TINY, "faults": f}))

    self.assertIsNone(spec(attack="alie", attack_scale=3.0))
    self.assertEqual(spec(link_failure=0.1, attack="gaussian", attack_scale=2.0),
                     spec(link_failure=0.1))  # the same StepSpec, hence the same program
    self.assertEqual(spec(byzantine=1, attack="alie"),
                     faults.Spec(byzantine=1, attack="alie", attack_scale=10.0))
    ring = topology.make("ring", 6)
    f = faults.sample(faults.stream_key(0), 0, ring.mixing(), faults.Spec(link_failure=0.2))
    self.assertIsNone(f.mixing.attack)
    x = jnp.arange(12.0).reshape(6, 2)
    clean = jax.make_jaxpr(combine_lib.combine)(x, ring.mixing())
    self.assertEqual(str(jax.make_jaxpr(combine_lib.combine)(x, ring.mixing()._replace(
        attack=None))), str(clean))

  @parameterized.parameters(
      ({"byzantine": 4}, "faults.byzantine=4 must be an integer in \\[0, 4\\)"),
      ({"byzantine": -1}, "faults.byzantine=-1"), ({"byzantine": True}, "faults.byzantine=True"),
      ({"byzantine": 1.0}, "faults.byzantine=1.0"),
      ({"byzantine": 1, "attack": "krum"}, "unknown faults.attack 'krum'; expected one of: "
       "sign_flip, scale, gaussian, alie"),
      ({"byzantine": 1, "attack_scale": float("nan")}, "faults.attack_scale=nan must be a finite"),
      ({"byzantine": 1, "attack_scale": "10"}, "faults.attack_scale='10'"))
  def test_check_spec_names_the_field(self, fields, message):
    with self.assertRaisesRegex(ValueError, f"^{message}[^\\n]*$"):
      faults.check_spec(faults.Spec(**fields), 4)
    faults.check_spec(faults.Spec(byzantine=3, attack="alie", attack_scale=-1), 4)


class HonestMetricsTest(absltest.TestCase):

  def test_a_run_with_a_byzantine_agent_reports_over_the_honest_agents(self):
    raw = {**TINY, "num_steps": 4, "eval_every": 2, "faults": {"byzantine": 1, "seed": 2}}
    d = tiny_data()
    history = train.train_and_evaluate(raw, data=d, verbose=False)
    c = config.resolve(raw)
    honest = faults.honest_agents(faults.spec_from_config(c), 4)
    self.assertLen(honest, 3)
    self.assertEqual([r["step"] for r in history], [0, 2, 4])
    for row in history:
      self.assertEqual(row["byzantine"], 1)
      acc = np.asarray(row["test_acc_per_agent"])
      self.assertLen(acc, 4)  # every agent listed, the Byzantine one too
      self.assertAlmostEqual(row["test_acc_mean"], acc[honest].mean(), delta=1e-6)
      self.assertAlmostEqual(row["test_acc_min"], acc[honest].min(), delta=1e-6)
      self.assertAlmostEqual(row["test_acc_max"], acc[honest].max(), delta=1e-6)
      self.assertTrue(np.isfinite(row["consensus_distance"]))
    self.assertIsNone(history[0]["dropped_agents"])
    self.assertEqual(history[-1]["dropped_agents"], 0.0)

    # The run's own (cached) programs: honest agents that agree measure zero, whatever the
    # Byzantine agent's model is.
    objs = build.objects(c, d)
    progs = step_lib.programs_for(build.step_spec(c), objs.model, objs.algorithm,
                                  model_key=objs.model_key, algorithm_key=objs.algorithm_key)
    state = build.init_state(c, objs.model, objs.algorithm, objs.topology)  # shared init
    byz = np.flatnonzero(~np.isin(np.arange(4), honest))
    params = jax.tree.map(lambda x: x.at[byz].add(jax.random.normal(jax.random.key(0),
                                                                    x[:1].shape)), state.params)
    dev = inputs.device_data(d, data.partition_iid(len(d.train_labels), 4))
    ev = inputs.eval_set(d.test_images, d.test_labels, 64, 32, 0)
    sums, pm = jax.device_get((progs.evaluate(params, state.model_state, ev, dev.mean, dev.std),
                               progs.param_metrics(params, state.model_state, state.alg_state,
                                                   objs.topology)))
    names = combine_lib.layer_names(params)
    self.assertGreater(float(metrics.consensus_distance(params, names)[0]), 0.1)  # all agents
    self.assertLess(float(pm["consensus_distance"]), 1e-10)
    self.assertLess(float(sums["disagreement"]), 1e-10)
    self.assertNotEqual(float(sums["correct"][byz[0]]), float(sums["correct"][honest[0]]))
    self.assertEqual(float(sums["centroid_correct"]), float(sums["correct"][honest[0]]))

if __name__ == "__main__":
  absltest.main()
