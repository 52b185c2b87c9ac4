"""End-to-end tests of the compiled train step and ``train_and_evaluate`` on tiny models."""

import json
import os
import platform
import tempfile
from unittest import mock

import chex
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from fixtures import TINY, tiny_data, untimed

from drt_jax import (
  algorithms,
  backends,
  build,
  config,
  data,
  inputs,
  metrics,
  models,
  topology,
  train,
)
from drt_jax import step as step_lib

EXPECTED_METRICS = (
    "step", "train_loss", "test_acc_mean", "test_acc_min", "test_acc_max", "centroid_test_acc",
    "train_acc_mean", "gen_gap", "consensus_distance", "output_disagreement",
    "bytes_per_agent_step", "self_weight_mean", "drt_log1p_mean", "drt_mean")


class TrainAndEvaluateTest(parameterized.TestCase):

  def test_one_config_on_other_data_builds_its_own_programs(self):
    # A sweep over datasets runs one config in one process: the cached programs must follow the
    # data's classes and image shape, not the first run's.
    c = {**TINY, "algorithm": "atc", "num_steps": 1, "eval_every": 0}
    for d in (tiny_data(), data.synthetic(num_train=256, num_test=64, num_classes=4,
                                          shape=(8, 8, 1), seed=0), tiny_data(shape=(6, 6, 1))):
      history = train.train_and_evaluate(c, data=d)
      self.assertTrue(np.isfinite(history[-1]["train_loss"]))

  @parameterized.parameters(*algorithms.NAMES)
  def test_every_algorithm_runs_and_reports_every_metric(self, name):
    history = train.train_and_evaluate({**TINY, "algorithm": name}, data=tiny_data())
    self.assertEqual([r["step"] for r in history], [0, 3, 6])
    for key in EXPECTED_METRICS:
      if name == "local" and key in ("self_weight_mean", "drt_log1p_mean", "drt_mean"):
        continue
      self.assertIn(key, history[-1])
    last = history[-1]
    self.assertTrue(np.isfinite(last["train_loss"]))
    self.assertBetween(last["test_acc_mean"], 0.0, 1.0)
    self.assertGreater(last["consensus_distance"], 0.0)  # agents saw different batches
    if algorithms.uses_drt(name):
      self.assertTrue(any(k.startswith("self_weight/") for k in last))
      self.assertBetween(last["self_weight_mean"], 0.05 - 1e-6, 1.0)

  def test_learns_the_synthetic_task(self):
    d = data.synthetic(num_train=512, num_test=256, shape=(8, 8, 1), separation=0.5, seed=1)
    history = train.train_and_evaluate(
        {**TINY, "algorithm": "atc", "num_steps": 60, "eval_every": 60}, data=d)
    self.assertGreater(history[-1]["test_acc_mean"], history[0]["test_acc_mean"] + 0.3)

  def test_full_graph_atc_equals_one_model_averaging(self):
    # ATC on the fully connected graph with uniform 1/K weights: agents agree after every step.
    history = train.train_and_evaluate(
        {**TINY, "algorithm": "atc", "topology": "full", "topology_weights": "uniform"},
        data=tiny_data())
    self.assertLess(history[-1]["consensus_distance"], 1e-10)
    self.assertLess(history[-1]["output_disagreement"], 1e-10)

  def test_final_full_test_evaluates_the_whole_split_at_the_last_step_only(self):
    run = {**TINY, "algorithm": "atc", "eval_examples": 16}
    history = untimed(train.train_and_evaluate({**run, "final_full_test": True},
                                               data=tiny_data()))
    whole = untimed(train.train_and_evaluate({**run, "eval_examples": 0}, data=tiny_data()))
    self.assertEqual([("final_test_acc_mean" in r) for r in history],
                     [False] * (len(history) - 1) + [True])
    last, want = history[-1], whole[-1]
    self.assertEqual(last["final_test_acc_mean"], want["test_acc_mean"])
    self.assertEqual(last["final_centroid_test_acc"], want["centroid_test_acc"])
    self.assertEqual(last["final_output_disagreement"], want["output_disagreement"])
    # The 16-image numbers of the run are those of a run without the final evaluation.
    plain = untimed(train.train_and_evaluate(run, data=tiny_data()))
    self.assertEqual(plain[-1]["test_acc_mean"], last["test_acc_mean"])

  def test_cosine_schedule_decays_the_update_to_zero(self):
    opt = algorithms.local_optimizer("sgd", 0.5, schedule="cosine", num_steps=4)
    params = jnp.zeros(2)
    state = opt.init(params)
    sizes = []
    for _ in range(5):
      updates, state = opt.update(jnp.ones(2), state, params)
      sizes.append(float(-updates[0]))
    np.testing.assert_allclose(sizes, [0.5, 0.5 * (1 + np.cos(np.pi / 4)) / 2, 0.25,
                                       0.5 * (1 + np.cos(3 * np.pi / 4)) / 2, 0.0], atol=1e-6)
    with self.assertRaisesRegex(ValueError, "needs num_steps"):
      algorithms.local_optimizer("sgd", 0.5, schedule="cosine")
    with self.assertRaisesRegex(ValueError, "unknown schedule 'step'"):
      algorithms.local_optimizer("sgd", 0.5, schedule="step")

  def test_workdir_holds_config_and_one_row_per_evaluation(self):
    with tempfile.TemporaryDirectory() as workdir:
      history = train.train_and_evaluate({**TINY, "algorithm": "drt"}, workdir=workdir,
                                         data=tiny_data())
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
      with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    self.assertEqual([r["step"] for r in rows], [r["step"] for r in history])
    self.assertEqual(saved["algorithm"], "drt")

  def test_in_memory_agent_indices_are_used(self):
    d = tiny_data()
    parts = [np.arange(k * 40, (k + 1) * 40) for k in range(4)]
    history = train.train_and_evaluate({**TINY, "num_steps": 2, "eval_every": 2},
                                       data={**d._asdict(), "agent_indices": parts})
    self.assertEqual(history[-1]["step"], 2)
    self.assertAlmostEqual(history[-1]["epoch"], 2 * 8 / 40)

  @parameterized.named_parameters(
      ("unknown_field", {"learning_rat": 0.1}, "unknown config field 'learning_rat'"),
      ("unknown_algorithm", {"algorithm": "gossip"}, "config.algorithm='gossip'"),
      ("unknown_topology", {"topology": "cube"}, "config.topology='cube'"),
      ("unknown_backend", {"backend": "pmap"}, "config.backend='pmap'"),
      ("unknown_model", {"model": "vgg"}, "config.model='vgg'"),
      ("unknown_conv", {"conv": "fft"}, "config.conv='fft'"),
      ("bad_lr", {"learning_rate": 0.0}, "config.learning_rate=0.0"),
      ("bad_floor", {"drt": {"floor": 1.0}}, "config.drt.floor=1.0"),
      ("bad_strength", {"drt": {"strength": -1.0}}, "config.drt.strength=-1.0"),
      ("bad_agents", {"num_agents": 0}, "config.num_agents=0"),
      ("batch_too_big", {"batch_size": 100}, "exceeds agent 0's partition of 64"),
      ("too_many_agents", {"num_agents": 300}, "num_agents=300 but synthetic has only 256"),
      ("chunk_not_dividing", {"backend": "chunked", "chunk_size": 3}, "config.chunk_size=3"),
      ("bad_checkpoint_every", {"checkpoint_every": -1}, "config.checkpoint_every=-1"),
      ("bad_keep_checkpoints", {"keep_checkpoints": 0}, "config.keep_checkpoints=0"),
      ("bad_dropout", {"faults": {"agent_dropout": 1.5}}, "config.faults.agent_dropout=1.5"),
      ("bad_fault_seed", {"faults": {"seed": -1}}, "config.faults.seed=-1"),
      ("unknown_fault", {"faults": {"crash": 0.1}}, "unknown config field 'faults.crash'"),
      ("disconnected_graph", {"topology": "erdos_renyi", "topology_options": {"p": 0.01}},
       "disconnected"),
      ("unknown_topology_option", {"topology_options": {"radius": 2}},
       "config.topology_options.radius=2 is not accepted"),
      ("unknown_model_option", {"model_options": {"radius": 2}},
       "config.model_options.radius=2 is not accepted; expected an option of 'mlp'"),
      ("infinite_learning_rate", {"learning_rate": float("inf")}, "config.learning_rate=inf"),
      ("strength_not_a_number", {"drt": {"strength": None}}, "config.drt.strength=None"),
      ("negative_seed", {"seed": -1}, "config.seed=-1"),
      ("agents_as_bool", {"num_agents": True}, "config.num_agents=True"),
      ("drt_not_a_mapping", {"drt": 2.0}, "config.drt=2.0 is not accepted; expected a mapping"),
      ("unknown_weight_rule", {"topology_weights": "max_degree"},
       "config.topology_weights='max_degree'"),
      ("bad_lazy", {"lazy": 1.0}, "config.lazy=1.0"),
      ("bad_self_weight", {"self_weight": -0.5}, "config.self_weight=-0.5"),
      ("bad_alpha", {"partition": "dirichlet", "dirichlet_alpha": 0.0},
       "config.dirichlet_alpha=0.0"),
      ("unknown_partition", {"partition": "pathological"}, "config.partition='pathological'"),
      ("bad_momentum", {"momentum": 1.0}, "config.momentum=1.0"),
      ("unknown_optimizer", {"optimizer": "lion"}, "config.optimizer='lion'"),
      ("bad_validation", {"validation_fraction": 1.0}, "config.validation_fraction=1.0"),
  )
  def test_bad_input_is_refused_in_one_line(self, override, message):
    with tempfile.TemporaryDirectory() as workdir:
      target = os.path.join(workdir, "run")
      with self.assertRaises(ValueError) as ctx:
        train.train_and_evaluate({**TINY, **override}, workdir=target, data=tiny_data())
      self.assertFalse(os.path.exists(target))  # nothing written on refusal
    self.assertIn(message, str(ctx.exception))
    self.assertNotIn("\n", str(ctx.exception))

  def test_bad_data_model_and_workdir_are_refused_in_one_line(self):
    d = tiny_data()

    class NanInit(flax_nn.Module):
      @flax_nn.compact
      def __call__(self, x, train):
        del train
        w = self.param("w", lambda key, shape: jnp.full(shape, jnp.nan), (x[0].size, 10))
        return x.reshape(x.shape[0], -1) @ w

    with tempfile.TemporaryDirectory() as tmp:
      a_file = os.path.join(tmp, "file")
      with open(a_file, "w") as f:
        f.write("x")
      other = os.path.join(tmp, "other")
      os.makedirs(other)
      with open(os.path.join(other, "config.json"), "w") as f:
        json.dump({**config.resolve(TINY).to_dict(), "num_steps": 99}, f)
      cases = [
          ("wrong_k", dict(data={**d._asdict(), "agent_indices": [np.arange(10)] * 3}),
           "index lists for 3 agents but config.num_agents=4"),
          ("unknown_dataset", dict(config={**TINY, "dataset": "nope"}, data=None),
           "unknown dataset 'nope'"),
          ("nan_init", dict(model=models.from_flax(NanInit(), (8, 8, 1), 10)),
           "initial parameters are not finite on agents [0, 1, 2, 3]"),
          ("unwritable_workdir", dict(workdir=os.path.join(a_file, "run")), "is a file"),
          ("another_configs_run", dict(workdir=other), "holds a run of a different config"),
      ]
      for name, kw, message in cases:
        kw = {"config": TINY, "data": d, "workdir": os.path.join(tmp, name), **kw}
        with self.assertRaises(ValueError, msg=name) as ctx:
          train.train_and_evaluate(kw.pop("config"), **kw)
        self.assertIn(message, str(ctx.exception), name)
        self.assertNotIn("\n", str(ctx.exception), name)
        if name != "another_configs_run":
          self.assertFalse(os.path.exists(os.path.join(tmp, name)), name)
      self.assertEqual(sorted(os.listdir(other)), ["config.json"])  # left untouched

  def test_bad_matrices_are_refused_in_one_line(self):
    ring = topology.make("ring", 4).dense()
    negative = ring.copy()
    negative[0, 1], negative[1, 1] = -0.1, negative[1, 1] + 0.1 + ring[0, 1]
    for mats, message in (([ring * 0.5], "sums to 0.5, not 1"),
                          ([negative], "negative weights"),
                          ([np.eye(4)], "disconnected"),
                          ([ring[:3, :3]], "sums to")):
      with self.assertRaises(ValueError) as ctx:
        topology.from_matrices(np.stack(mats))
      self.assertIn(message, str(ctx.exception))
      self.assertNotIn("\n", str(ctx.exception))

  def test_bfloat16_compute_keeps_float32_parameters(self):
    d = tiny_data(shape=(12, 12, 1))
    opts = {"features": (4, 8), "hidden": 16}
    c = config.resolve({**TINY, "model": "cnn", "model_options": opts, "precision": "bfloat16"})
    model = build.model(c, d)
    topo = build.topology(c)
    state, _ = _one_step(c, model, lambda alg: build.init_state(c, model, alg, topo), topo,
                         _device_data(c, d))
    chex.assert_trees_all_equal_dtypes(state.params, jax.tree.map(jnp.float32, state.params))
    one = {"params": jax.tree.map(lambda x: x[0], state.params)}
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 1))
    logits, _ = model.apply(one, x, False)
    full, _ = build.model(config.resolve({**c.to_dict(), "precision": "float32"}),
                               d).apply(one, x, False)
    chex.assert_type(logits, jnp.float32)
    self.assertFalse(np.array_equal(logits, full))  # computed in bfloat16 ...
    np.testing.assert_allclose(logits, full, atol=0.05, rtol=0.05)  # ... to its precision
    history = train.train_and_evaluate({**c.to_dict(), "num_steps": 2, "eval_every": 2}, data=d)
    self.assertBetween(history[-1]["test_acc_mean"], 0.0, 1.0)

  def test_conv_formulation_reaches_the_model(self):
    d = tiny_data(shape=(12, 12, 1))
    c = config.resolve({**TINY, "model": "cnn", "model_options": {"features": (4,), "hidden": 8},
                        "conv": "taps"})
    measured = jax.default_backend() in ("gpu", "cpu")
    self.assertEqual(backends.best_conv("auto", "float32", 64), "taps" if measured else "xla")
    self.assertEqual(backends.best_conv("auto", "float32", 1), "xla")  # nothing is grouped
    cpu = jax.default_backend() == "cpu"  # 2 agents: taps on CPU, unmeasured on GPU
    self.assertEqual(backends.best_conv("auto", "float32", 2), "taps" if cpu else "xla")
    self.assertEqual(backends.best_conv("auto", "bfloat16", 64), "xla")
    self.assertEqual(backends.best_conv("xla", "float32", 64), "xla")
    taps, xla = (build.model(config.resolve({**c.to_dict(), "conv": v}), d)
                 for v in ("taps", "xla"))
    v = taps.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 12, 12, 1))
    np.testing.assert_allclose(taps.apply(v, x, False)[0], xla.apply(v, x, False)[0],
                               rtol=1e-5, atol=1e-5)
    with self.assertRaisesRegex(ValueError, "unknown conv 'fft'"):
      build.model(config.resolve({**c.to_dict(), "model_options": {"conv": "fft"}}),
                       d).init(jax.random.key(0))

  def test_host_memory_hint_names_the_tunable_only_where_it_helps(self):
    with tempfile.TemporaryDirectory() as tmp:
      madvise, never = os.path.join(tmp, "madvise"), os.path.join(tmp, "never")
      with open(madvise, "w") as f:
        f.write("always [madvise] never\n")
      with open(never, "w") as f:
        f.write("always madvise [never]\n")
      env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
      with mock.patch.dict(os.environ, env, clear=True):
        hint = backends.host_memory_hint(madvise)
        self.assertIsNone(backends.host_memory_hint(never))
        self.assertIsNone(backends.host_memory_hint(os.path.join(tmp, "missing")))
      tunables = {**env, "GLIBC_TUNABLES": backends.HUGE_PAGES_TUNABLE}
      with mock.patch.dict(os.environ, tunables, clear=True):
        self.assertIsNone(backends.host_memory_hint(madvise))
    libc, version = platform.libc_ver()
    glibc = libc == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
    if jax.default_backend() == "cpu" and glibc:
      self.assertIn(f"GLIBC_TUNABLES={backends.HUGE_PAGES_TUNABLE}", hint)
    else:
      self.assertIsNone(hint)

  def test_auto_conv_follows_the_agents_each_device_vmaps(self):
    d = tiny_data(shape=(12, 12, 1))
    x = jax.random.normal(jax.random.key(1), (2, 12, 12, 1))

    def convolutions(overrides):
      c = config.resolve({**TINY, "model": "cnn", "conv": "auto", **overrides,
                          "model_options": {"features": (4,), "hidden": 8}})
      model = build.model(c, d)
      v = model.init(jax.random.key(0))
      return jax.jit(lambda x: model.apply(v, x, False)).lower(x).as_text().count("convolution")

    n = jax.device_count()
    cases = [({"num_agents": 8, "backend": "vmap"}, 8), ({"num_agents": 8, "backend": "map"}, 1),
             ({"num_agents": 8, "backend": "chunked", "chunk_size": 2}, 2),
             ({"num_agents": 4 * n, "backend": "auto"}, 4 if n > 1 else 4 * n)]
    for overrides, agents in cases:
      self.assertEqual(backends.vmapped_agents(overrides["backend"], overrides["num_agents"],
                                               overrides.get("chunk_size")), agents, overrides)
      grouped = agents >= backends.TAPS_FROM_AGENTS.get(jax.default_backend(), agents + 1)
      self.assertEqual(convolutions(overrides) == 0, grouped, overrides)  # taps: no conv op

  def test_same_config_and_seeds_give_the_same_history(self):
    c = {**TINY, "algorithm": "drt", "num_steps": 4, "eval_every": 2,
         "faults": {"agent_dropout": 0.2, "link_failure": 0.2, "straggler": 0.2, "seed": 1}}
    first, second = (untimed(train.train_and_evaluate(c, data=tiny_data())) for _ in range(2))
    self.assertEqual(first, second)
    reseeded = untimed(train.train_and_evaluate({**c, "faults": {**c["faults"], "seed": 2}},
                                                data=tiny_data()))
    self.assertNotEqual(first[-1], reseeded[-1])

  def test_wrong_number_of_index_lists(self):
    d = tiny_data()
    with self.assertRaisesRegex(ValueError, "index lists for 3 agents"):
      train.train_and_evaluate(
          TINY, data={**d._asdict(), "agent_indices": [np.arange(10)] * 3})


def _one_step(c, model, state_fn, topo, dev, steps=1):
  alg = build.algorithm(c)
  progs = build.programs(c, model, alg)
  state = state_fn(alg)
  for _ in range(steps):
    state, _ = progs.train_step(state, topo, dev)
  return state, progs


def _device_data(c, d):
  """The data as ``c.backend`` wants it (``shard``: each device its agents' examples)."""
  return inputs.device_data(d, data.partition_iid(len(d.train_labels), c.num_agents, seed=0),
                           c.backend)


class CompiledStepTest(parameterized.TestCase):

  def test_backends_agree_on_a_small_cnn(self):
    d = tiny_data(shape=(12, 12, 1))
    base = config.resolve({**TINY, "num_agents": 8, "model": "cnn",
                           "model_options": {"features": (4, 8, 8), "hidden": 16,
                                             "batch_norm": True}, "algorithm": "drt"})
    model = build.model(base, d)
    topo = build.topology(base)
    results = {}
    for backend, chunk in (("vmap", 0), ("chunked", 4), ("map", 0), ("shard", 0)):
      if backend == "shard" and jax.local_device_count() < 2:
        continue
      c = config.resolve({**base.to_dict(), "backend": backend, "chunk_size": chunk})
      state, _ = _one_step(c, model, lambda alg, c=c: build.init_state(c, model, alg, topo),
                           topo, _device_data(c, d), steps=2)
      results[backend] = (state.params, state.model_state)
    self.assertGreaterEqual(len(results), 3)
    for backend, tree in results.items():
      chex.assert_trees_all_close(tree, results["vmap"], atol=1e-5, rtol=1e-5,
                                  custom_message=backend)

  def test_compiles_once_for_new_weights_and_time_varying_graphs(self):
    c = config.resolve({**TINY, "num_agents": 8, "algorithm": "drt"})
    d = tiny_data()
    model = build.model(c, d)
    alg = build.algorithm(c)
    progs = build.programs(c, model, alg)
    dev = _device_data(c, d)
    ring = topology.make("ring", 8)
    state = build.init_state(c, model, alg, ring)
    for topo in (ring, ring.lazy(0.5), topology.make("ring", 8, weights="uniform")):
      state, _ = progs.train_step(state, topo, dev)
    self.assertEqual(progs.train_step._cache_size(), 1)
    # A schedule has its own static shape [T, K, D] (padded here to the ring's width D = 3):
    # one more compile, then none while the steps walk through its period.
    one_peer = topology.make("one_peer_exponential", 8)
    schedule = topology.Topology(
        np.concatenate([one_peer.nbr_idx, one_peer.nbr_idx[..., :1]], -1),
        np.concatenate([one_peer.nbr_w, 0 * one_peer.nbr_w[..., :1]], -1))
    for _ in range(2 * schedule.period):
      state, _ = progs.train_step(state, schedule, dev)
    self.assertEqual(progs.train_step._cache_size(), 2)
    self.assertEqual(int(state.step), 3 + 2 * schedule.period)

  @parameterized.parameters("vmap", "shard")
  def test_train_and_evaluate_compiles_each_program_once(self, backend):
    c = {**TINY, "num_agents": 8, "backend": backend, "algorithm": "drt",
         "model_options": {"hidden": (12,)}}  # a shape no other test compiles in this process
    with jax.log_compiles(), self.assertLogs("jax._src.interpreters.pxla", "WARNING") as logs:
      train.train_and_evaluate(c, data=tiny_data())
    compiled = [line.split("Compiling jit(")[1].split(")")[0] for line in logs.output
                if "Compiling jit(" in line]
    for program in ("train_step", "evaluate", "param_metrics"):
      self.assertEqual(compiled.count(program), 1, f"{program} compiled {compiled}")

  def test_combined_batch_stats_agree_on_the_full_graph(self):
    d = tiny_data(shape=(12, 12, 1))
    opts = {"features": (4, 8, 8), "hidden": 16, "batch_norm": True}
    stats = {}
    for combine_stats in (False, True):
      c = config.resolve({**TINY, "model": "cnn", "model_options": opts, "topology": "full",
                          "topology_weights": "uniform", "combine_batch_stats": combine_stats})
      model = build.model(c, d)
      topo = build.topology(c)
      state, _ = _one_step(c, model, lambda alg, c=c: build.init_state(c, model, alg, topo),
                           topo, _device_data(c, d))
      stats[combine_stats] = state.model_state
    spread = lambda tree: max(float(jnp.max(jnp.abs(x - x[:1]))) for x in jax.tree.leaves(tree))  # noqa: E731
    self.assertGreater(spread(stats[False]), 1e-4)  # local statistics differ across agents
    self.assertLess(spread(stats[True]), 1e-6)  # uniform averaging makes them equal

  def test_shared_batch_stats_count_in_the_bytes_sent(self):
    d = tiny_data(shape=(12, 12, 1))
    opts = {"features": (4, 8, 8), "hidden": 16, "batch_norm": True}
    c = {**TINY, "model": "cnn", "model_options": opts, "num_steps": 1, "eval_every": 0}
    sent = {s: train.train_and_evaluate({**c, "combine_batch_stats": s}, data=d)[-1][
        "bytes_per_agent_step"] for s in (False, True)}
    variables = build.model(config.resolve(c), d).init(jax.random.key(0))
    stats = {k: v for k, v in variables.items() if k != "params"}
    ratio = metrics.tree_bytes(variables, stacked=False) / metrics.tree_bytes(
        variables["params"], stacked=False)
    self.assertNotEmpty(jax.tree.leaves(stats))
    self.assertAlmostEqual(sent[True] / sent[False], ratio, places=6)


class AgentsFiniteTest(absltest.TestCase):

  def test_flags_exactly_the_agents_with_an_inf_or_nan(self):
    big = jnp.finfo(jnp.float32).max
    tree = {"w": jnp.full((5, 3, 2), big), "b": jnp.ones((5, 4), jnp.bfloat16),
            "count": jnp.zeros((5,), jnp.int32)}  # sums of huge finite values still count
    tree["w"] = tree["w"].at[1, 2, 1].set(jnp.inf).at[3, 0, 0].set(-jnp.inf)
    tree["b"] = tree["b"].at[4, 3].set(jnp.nan)
    np.testing.assert_array_equal(step_lib.agents_finite(tree), [True, False, True, False, False])
    negated = {"w": -tree["w"][jnp.array([0, 2])]}
    np.testing.assert_array_equal(step_lib.agents_finite(negated), [True, True])


class SamplerTest(absltest.TestCase):

  def test_each_agent_draws_only_its_own_indices_and_covers_them_each_epoch(self):
    parts = [np.arange(0, 10), np.arange(10, 17), np.arange(17, 40)]
    idx, counts = data.pad_partition(parts, 40)
    batch = 5
    key = jax.random.key(3)
    draws = [np.asarray(data.sample_indices(key, s, jnp.asarray(idx), jnp.asarray(counts), batch))
             for s in range(14)]
    for k, part in enumerate(parts):
      stream = np.concatenate([d[k] for d in draws])
      self.assertTrue(set(stream) <= set(part.tolist()))
      n = len(part)
      for e in range(len(stream) // n):  # every full local epoch is a permutation of the part
        self.assertCountEqual(stream[e * n:(e + 1) * n].tolist(), part.tolist())
      self.assertFalse(np.array_equal(stream[:n], stream[n:2 * n]))  # reshuffled per epoch


if __name__ == "__main__":
  absltest.main()
