"""A child process for checkpoint_test: trains a tiny config into a workdir, checkpointing.

  python tests/resume_worker.py WORKDIR [STEP_DELAY_SECONDS]

The optional delay slows every train step down (not its results), so that the parent can kill the
run at a random step. The compilation cache comes from ``JAX_COMPILATION_CACHE_DIR``.
"""

import sys
import time

CONFIG = {
    "num_agents": 4, "model": "mlp", "model_options": {"hidden": (16,)}, "batch_size": 8,
    "num_steps": 24, "eval_every": 5, "eval_examples": 64, "train_eval_examples": 64,
    "eval_batch_size": 32, "backend": "vmap", "optimizer": "momentum", "learning_rate": 0.05,
    "algorithm": "drt", "checkpoint_every": 2, "keep_checkpoints": 2,
}


def main(workdir: str, delay: float = 0.0) -> None:
  import jax  # noqa: PLC0415 -- the parent imports this module for CONFIG alone

  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from drt_jax import data, train  # noqa: PLC0415
  from drt_jax import step as step_lib  # noqa: PLC0415

  if delay:
    programs_for = step_lib.programs_for

    def slow_programs(*args, **kw):
      progs = programs_for(*args, **kw)

      def slow_step(*step_args):
        out = progs.train_step(*step_args)
        time.sleep(delay)
        return out

      return progs._replace(train_step=slow_step)

    step_lib.programs_for = slow_programs
  d = data.synthetic(num_train=256, num_test=64, shape=(8, 8, 1), seed=0)
  train.train_and_evaluate(CONFIG, workdir, d)


if __name__ == "__main__":
  main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
