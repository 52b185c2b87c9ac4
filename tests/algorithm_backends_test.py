"""Every algorithm on every back-end: its step over agents split across 8 devices equals the
step on one device and moves no parameter-sized all-gathers; whole train steps agree across the
back-ends for an algorithm with extra stacked state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

from drt_jax import algorithms, backends, models, topology, train
from drt_jax import step as step_lib
from tests import fixtures

K = 8


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal((K, 40, 25)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal((K, 25)), jnp.float32)},
          "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((K, 25, 4)), jnp.float32)}}


class ShardedStepTest(parameterized.TestCase):

  @parameterized.parameters(*algorithms.NAMES)
  def test_sharded_step_equals_one_device_and_gathers_no_parameters(self, name):
    self.assertGreaterEqual(jax.device_count(), K)
    alg = algorithms.make(name, optax.sgd(0.05, momentum=0.9))
    topo = topology.make("ring", K)
    params = _params()
    state = alg.init(params, topo)
    step = jax.jit(alg.step)
    one_p, one_s = params, state
    split_p, split_s = (backends.place(t, "shard", K) for t in (params, state))
    split_topo = backends.place(topo, "shard", K, stacked=False)
    for t in range(3):
      grads = jax.tree.map(lambda x, t=t: jnp.sin(x + t), params)
      one_p, one_s = step(one_p, grads, one_s, topo)
      split_p, split_s = step(split_p, backends.place(grads, "shard", K), split_s, split_topo)
    leaf = jax.tree.leaves(split_p)[0]
    self.assertEqual(len(leaf.sharding.device_set), K)  # the agents stayed split
    for a, b in zip(jax.tree.leaves((one_p, one_s)), jax.tree.leaves((split_p, split_s)),
                    strict=True):
      if jnp.issubdtype(a.dtype, jnp.inexact):
        np.testing.assert_allclose(backends.to_host(b), np.asarray(a), atol=2e-5, rtol=2e-5)
    hlo = step.lower(split_p, split_p, split_s, split_topo).compile().as_text()
    big = [s for s in fixtures.collectives(hlo)["all-gather"] if fixtures.elements(s) >= 40 * 25]
    self.assertEmpty(big, f"{name} all-gathers parameter-sized arrays on the ring: {big}")


class ShardedProgramsTest(parameterized.TestCase):

  @parameterized.parameters(*[(n, {}) for n in algorithms.NAMES],
                            ("atc", {"aggregation": "trimmed_mean", "trim": 1}),
                            ("choco", {"compressor": "quantize"}))
  def test_programs_build_on_the_agents_mesh(self, name, options):
    # The state's shardings are found on a stand-in graph of K agents, which an algorithm's own
    # checks of a real topology (a trimmed mean's neighbourhood sizes) must not refuse.
    model = models.make("mlp", 10, input_shape=(8, 8, 1), hidden=(8,))
    alg = algorithms.make(name, optax.sgd(0.1), **options)
    spec = step_lib.StepSpec(num_agents=K, batch_size=2, backend="shard")
    programs = step_lib.build_programs(spec, model, alg)
    self.assertTrue(callable(programs.train_step))


class TrainBackendsTest(absltest.TestCase):

  def test_gradient_tracking_trains_the_same_on_every_backend(self):
    # Its state holds two more stacked trees (tracker and last gradients): every back-end must
    # place and carry them as the parameters.
    cfg = {**fixtures.TINY, "algorithm": "gradient_tracking", "num_agents": 4, "num_steps": 3,
           "eval_every": 3, "chunk_size": 2}
    finals = {}
    for backend in ("vmap", "chunked", "map", "shard"):
      history = train.train_and_evaluate({**cfg, "backend": backend}, data=fixtures.tiny_data(),
                                         verbose=False)
      finals[backend] = history[-1]
    for backend, row in finals.items():
      for field in ("test_acc_mean", "consensus_distance", "train_loss"):
        np.testing.assert_allclose(row[field], finals["vmap"][field], rtol=1e-4, atol=1e-5,
                                   err_msg=f"{backend} {field}")


if __name__ == "__main__":
  absltest.main()
