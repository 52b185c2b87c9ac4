"""The agent axis over devices: circulant graphs exchange neighbours by collective-permute."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized
from jax.sharding import NamedSharding, PartitionSpec

from drt_jax import (
  algorithms,
  backends,
  build,
  combine,
  config,
  data,
  inputs,
  partition,
  topology,
  train,
)
from drt_jax import step as step_lib
from tests import fixtures

K = 16
CIRCULANT = ("ring", "torus", "exponential", "one_peer_exponential", "full")


def _gathered(topo):
  """The same topology without its circulant structure: neighbours by gather."""
  return dataclasses.replace(topo, shifts=None)


class CirculantTest(parameterized.TestCase):

  @parameterized.parameters(*CIRCULANT)
  def test_structure_is_found_and_rolls_equal_gathers_and_dense(self, kind):
    topo = topology.make(kind, K)
    self.assertIsNotNone(topo.shifts, kind)
    x = {"w": jax.random.normal(jax.random.key(0), (K, 3, 5)),
         "b": jnp.arange(K * 2.0).reshape(K, 2)}
    fn = jax.jit(combine.combine)
    for t in range(topo.period):
      rolled = fn(x, topo, t)
      gathered = fn(x, _gathered(topo), t)
      dense = combine.combine_dense(x, topo.dense(t))
      for name in x:
        np.testing.assert_allclose(rolled[name], gathered[name], atol=1e-6, err_msg=kind)
        np.testing.assert_allclose(rolled[name], dense[name], atol=1e-5, err_msg=kind)

  @parameterized.parameters("star", "grid", "random_matching", "erdos_renyi")
  def test_other_graphs_gather(self, kind):
    self.assertIsNone(topology.make(kind, K, **({"p": 0.5} if kind == "erdos_renyi" else {}))
                      .shifts)

  def test_weights_of_the_same_structure_do_not_recompile(self):
    fn = jax.jit(lambda x, topo: combine.combine(x, topo))  # noqa: PLW0108 -- its own cache
    x = jnp.ones((K, 4))
    ring = topology.make("ring", K)
    for topo in (ring, ring.lazy(0.5), ring.with_self_weight(0.2),
                 topology.make("ring", K, weights="uniform")):
      fn(x, topo)
    self.assertEqual(fn._cache_size(), 1)


class CollectivesTest(parameterized.TestCase):
  """Under the agents mesh (8 virtual devices, conftest.py), the compiled programs move only
  boundary agents between devices for ring and torus: collective-permutes, and no all-gather of
  anything as large as the parameters."""

  def setUp(self):
    super().setUp()
    if jax.local_device_count() < 8:
      self.skipTest("needs 8 local devices")
    mesh = backends.agents_mesh()
    self.split = NamedSharding(mesh, PartitionSpec(backends.AGENTS))

  def _params(self):
    return jax.device_put({"dense": {"kernel": jnp.ones((K, 40, 25)), "bias": jnp.ones((K, 25))}},
                          self.split)

  def test_initial_state_is_created_split_over_the_mesh(self):
    d = data.synthetic(num_train=256, num_test=16, shape=(4, 4, 1), seed=0)
    c = config.resolve({"num_agents": K, "model": "mlp", "model_options": {"hidden": (8,)},
                        "backend": "shard", "algorithm": "drt", "same_init": False})
    model, alg = build.model(c, d), build.algorithm(c)
    state = build.init_state(c, model, alg, build.topology(c))
    n = jax.local_device_count()
    for leaf in jax.tree.leaves((state.params, state.alg_state)):
      if leaf.ndim and leaf.shape[0] == K:
        self.assertEqual(leaf.sharding.spec, PartitionSpec(backends.AGENTS))
        self.assertEqual(leaf.addressable_shards[0].data.shape[0], K // n)
    self.assertEqual(state.key.sharding.spec, PartitionSpec())

  def test_step_keeps_state_data_and_metrics_split_over_the_mesh(self):
    d = data.synthetic(num_train=256, num_test=16, shape=(4, 4, 1), seed=0)
    c = config.resolve({"num_agents": K, "model": "mlp", "model_options": {"hidden": (8,)},
                        "backend": "shard", "algorithm": "drt", "batch_size": 4})
    model, alg, topo = build.model(c, d), build.algorithm(c), build.topology(c)
    dev = inputs.device_data(d, data.partition_iid(len(d.train_labels), K), "shard")
    per_device = K // jax.device_count()
    for leaf in (dev.idx, dev.counts):
      self.assertEqual(leaf.sharding.spec, PartitionSpec(backends.AGENTS))
      self.assertEqual({s.data.shape[0] for s in leaf.addressable_shards}, {per_device})
    for leaf in (dev.images, dev.labels):
      self.assertEqual(leaf.sharding.spec, PartitionSpec(backends.AGENTS))
    self.assertTrue(dev.mean.sharding.is_fully_replicated)
    self.assertEqual(backends.local_agents(dev.idx), list(range(K)))  # one process holds all
    state = build.init_state(c, model, alg, topo)
    step = build.programs(c, model, alg).train_step
    # Each device samples from its own block: no collective moves examples between devices.
    block = dev.images.addressable_shards[0].data.size
    moved = [fixtures.elements(shape) for shapes in fixtures.collectives(
        step.lower(state, topo, dev).compile().as_text()).values() for shape in shapes]
    self.assertLess(max(moved), block, moved)
    state, metrics = step(state, topo, dev)
    for leaf in [*jax.tree.leaves(state.params), metrics["loss"], metrics["finite"]]:
      self.assertEqual(leaf.sharding.spec, PartitionSpec(backends.AGENTS))
    self.assertTrue(state.step.sharding.is_fully_replicated)
    np.testing.assert_array_equal(backends.to_host(metrics["finite"]), np.ones(K, bool))

  @parameterized.parameters(("shards", 0.0), ("dirichlet", 0.1))
  def test_each_device_holds_only_its_agents_examples(self, kind, alpha):
    d = data.synthetic(num_train=4096, num_test=16, shape=(4, 4, 1), seed=0)
    parts = partition.make(kind, d.train_labels, K, seed=0, alpha=alpha, classes_per_agent=2,
                           min_per_agent=8)
    dev = inputs.device_data(d, parts, "shard")
    whole = inputs.device_data(d, parts, "vmap")
    n, per = jax.device_count(), K // jax.device_count()
    rows = dev.images.shape[0] // n
    self.assertLess(max(s.data.nbytes for s in dev.images.addressable_shards),
                    d.train_images.nbytes)
    self.assertLess(inputs.device_bytes(dev.images), n * d.train_images.nbytes)
    idx, counts = backends.to_host(dev.idx), backends.to_host(dev.counts)
    labels = {s.device: np.asarray(s.data) for s in dev.labels.addressable_shards}
    for shard in dev.images.addressable_shards:
      j = shard.index[0].indices(dev.images.shape[0])[0] // rows
      mine = np.unique(np.concatenate(parts[j * per:(j + 1) * per]))
      np.testing.assert_array_equal(np.asarray(shard.data)[:len(mine)], d.train_images[mine])
      np.testing.assert_array_equal(labels[shard.device][:len(mine)], d.train_labels[mine])
      for k in range(j * per, (j + 1) * per):  # block positions lead to the agent's examples
        np.testing.assert_array_equal(mine[idx[k, :counts[k]]], parts[k])
    for step in (0, 5):  # the same batches as from one copy of the whole split
      for got, want in zip(step_lib.draw_batch(jax.random.key(3), step, dev, 4, backend="shard"),
                           step_lib.draw_batch(jax.random.key(3), step, whole, 4)):
        np.testing.assert_array_equal(backends.to_host(got), np.asarray(want))

  @parameterized.parameters("ring", "torus")
  def test_combine_uses_collective_permute_only(self, kind):
    topo = topology.make(kind, K)
    hlo = jax.jit(combine.combine, out_shardings=self.split).lower(
        self._params(), topo).compile().as_text()
    ops = fixtures.collectives(hlo)
    self.assertNotEmpty(ops["collective-permute"], kind)
    self.assertEmpty(ops["all-gather"], kind)

  @parameterized.product(kind=("ring", "torus"), name=("atc", "drt"))
  def test_algorithm_step_gathers_no_parameters(self, kind, name):
    topo = topology.make(kind, K)
    alg = algorithms.make(name, optax.sgd(0.1))
    params = self._params()
    state = backends.place(alg.init(params, topo), "shard", K)
    hlo = jax.jit(alg.step).lower(params, params, state, topo).compile().as_text()
    ops = fixtures.collectives(hlo)
    self.assertNotEmpty(ops["collective-permute"])
    big = [s for s in ops["all-gather"] if fixtures.elements(s) >= 40 * 25]
    self.assertEmpty(big, f"{name} on the {kind} all-gathers parameter-sized arrays: {big}")

  @parameterized.parameters("ring", "torus")
  def test_drt_exchanges_parameters_as_often_as_atc(self, kind):
    # The distances and the combine share one copy of each neighbour's leaves: XLA does not
    # merge collectives written twice, so DRT used to move every parameter twice.
    topo = topology.make(kind, K)
    params = self._params()
    permutes = {}
    for name in ("atc", "drt"):
      alg = algorithms.make(name, optax.sgd(0.1))
      state = backends.place(alg.init(params, topo), "shard", K)
      hlo = jax.jit(alg.step).lower(params, params, state, topo).compile().as_text()
      permutes[name] = sorted(s for s in fixtures.collectives(hlo)["collective-permute"]
                              if fixtures.elements(s) >= 25)
    self.assertNotEmpty(permutes["atc"])
    self.assertEqual(permutes["drt"], permutes["atc"])


class SubMeshTest(absltest.TestCase):
  """K that the device count does not divide: ``auto`` shards over the devices that divide K."""

  def test_training_on_six_of_eight_devices_equals_vmap(self):
    if jax.local_device_count() != 8:
      self.skipTest("needs 8 local devices")
    d = data.synthetic(num_train=240, num_test=32, shape=(4, 4, 1), seed=0)
    base = {"num_agents": 6, "model": "mlp", "model_options": {"hidden": (8,)}, "batch_size": 4,
            "algorithm": "drt", "num_steps": 4, "eval_every": 2, "eval_examples": 32,
            "train_eval_examples": 32, "eval_batch_size": 16}
    c = config.resolve({**base, "backend": "auto"})
    self.assertEqual(backends.resolve(c.backend, 6), "shard")
    model, alg, topo = build.model(c, d), build.algorithm(c), build.topology(c)
    state = build.init_state(c, model, alg, topo)
    for leaf in jax.tree.leaves(state.params):
      self.assertEqual(leaf.sharding.mesh.devices.tolist(), jax.devices()[:6])
      self.assertEqual({s.data.shape[0] for s in leaf.addressable_shards}, {1})
    dev = inputs.device_data(d, partition.make("iid", d.train_labels, 6, seed=0), "auto")
    self.assertEqual(dev.images.shape[0] % 6, 0)  # one block of examples per used device
    histories = {b: train.train_and_evaluate({**base, "backend": b}, data=d)
                 for b in ("auto", "vmap")}
    for got, want in zip(*histories.values(), strict=True):
      self.assertEqual(got.keys(), want.keys())
      for name, value in want.items():
        if isinstance(value, float) and name not in ("wall_time", "steps_per_sec"):
          np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


if __name__ == "__main__":
  absltest.main()
