r"""Breaks the code on purpose, one claim at a time, and checks that a test catches each break.

  python -m tests.breakages                 # all 41: 9-17 min on 2 cores shared with others
  python -m tests.breakages --list          # the table: name, file, the tests that must fail
  python -m tests.breakages --only grad-accum-sums --only nan-guard-params-only

A breakage is one exact text replacement in one file of lm/ and the tests that must catch it.
For each, the repository (lm/, tests/, experiments/, launch/, pyproject.toml) is copied to a
temporary directory beside a link to ../shared, the edit applied there, and only the named
tests run in the copy (`python -m pytest -q -x -p no:cacheprovider <ids>`, this interpreter,
cwd the copy; tests/conftest.py checks that the copy's `lm` is the one imported). A breakage is
caught when a test fails; it survives when they all pass. An edit whose text no longer occurs
exactly once is an ERROR: the code moved, and the breakage must be moved with it.

First the named tests run once on an unbroken copy (`--no_baseline` skips it): a test that
fails there would "catch" every breakage. That run also fills a JAX compilation cache that
the breakage runs share, so they compile only what the breakage changed. The cache stays in
the system's temporary directory for the next run (`--jax_cache=` for a fresh, throwaway
one); JAX keys it by the program, so a broken program never reuses an unbroken one's code.

Exit status 1 if any breakage survives or errors. Not part of the README's test command: slow.
On 2 CPU cores shared with other work (2026-11-30) it took 548 s wall and 6 minutes of CPU (the
baseline 256 s, then 1-21 s a breakage); under a load average of 15, 999 s.
"""

import argparse
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ('lm', 'tests', 'experiments', 'launch', 'pyproject.toml')
TIMEOUT_S = 900  # One pytest run; the slowest catcher takes about a minute on 2 busy cores.


@dataclasses.dataclass(frozen=True)
class Breakage:
  name: str
  file: str  # Relative to the repository root.
  old: str  # Must occur exactly once in the file.
  new: str
  tests: tuple[str, ...]  # Test ids, any of which failing counts as caught (-x: the first).


_PADDED_EVAL = ('tests/test_tasks.py::'
                'test_padded_eval_rows_are_left_out_of_loss_accuracy_and_confusion')

BREAKAGES = (
    # --- The claims of docs/RELIABILITY.md and the README (issue #17) ------------------------
    Breakage(
        'resume-ignores-checkpoint', 'lm/train.py',
        "    state = checkpoint.restore(self.ckpt, step, self.abstract_state)\n"
        "    if not self.read_only:\n",
        "    state = self._fresh_state()  # BREAKAGE: says it resumes, starts again.\n"
        "    if not self.read_only:\n",
        ('tests/test_train.py::test_resume_is_exact',)),
    Breakage(
        'resharding-restores-nothing', 'lm/train.py',
        "    state = checkpoint.restore(self.ckpt, step, self.abstract_state)\n"
        "    if not self.read_only:\n",
        "    state = self._fresh_state()  # BREAKAGE: says it resumes, starts again.\n"
        "    if not self.read_only:\n",
        ('tests/test_reliability.py::test_resharding_restores_identical_params',)),
    Breakage(
        'last-flush-masks-full-disk', 'lm/train.py',
        "      writer.close(quiet=True)\n",
        "      writer.close()  # BREAKAGE: the flush's OSError is raised over the report.\n",
        ('tests/test_reliability.py::'
         'test_a_full_disk_is_reported_once_and_not_masked_by_the_last_flush',)),
    Breakage(
        'last-flush-error-swallowed', 'lm/train.py',
        "      writer.close()  # In the try: a full disk at the last flush is reported too.\n",
        "",  # BREAKAGE: only the quiet close in `finally` is left; the run ends as if whole.
        ('tests/test_reliability.py::'
         'test_a_full_disk_is_reported_once_and_not_masked_by_the_last_flush',)),
    Breakage(
        'full-disk-lists-a-save-in-flight', 'lm/train.py',
        "      self.ckpt.wait_until_finished()\n    except _SAVE_ERRORS:\n",
        "      pass  # BREAKAGE: the list names a save in flight, which may never be written.\n"
        "    except _SAVE_ERRORS:\n",
        ('tests/test_reliability.py::'
         'test_a_metrics_write_on_a_full_disk_does_not_count_the_save_in_flight',)),
    Breakage(
        'reader-gives-up-on-a-vanished-step', 'lm/checkpoint.py',
        "_VANISHED = (FileNotFoundError, NotADirectoryError)\n",
        "_VANISHED = (FileNotFoundError,)  # BREAKAGE: the other error kills the reader.\n",
        ('tests/test_checkpoint.py::test_restore_latest_reads_again_when_a_listed_step_vanishes',)),
    Breakage(
        'distill-imports-orbax-up-front', 'lm/distill.py',
        "from lm.checkpoint import ocp  # Imports orbax at first use.\n",
        "import orbax.checkpoint as ocp  # BREAKAGE: 24 MiB under the compile peak.\n",
        ('tests/test_main.py::test_a_run_imports_orbax_and_tfds_only_when_it_uses_them',)),
    Breakage(
        'nan-guard-params-only', 'lm/steps.py',
        "  new = jax.lax.cond(finite, lambda: new, lambda: old)\n",
        "  new = new.replace(  # BREAKAGE: only the params and model state are kept.\n"
        "      params=jax.lax.cond(finite, lambda: new.params, lambda: state.params),\n"
        "      model_state=jax.lax.cond(finite, lambda: new.model_state,\n"
        "                               lambda: state.model_state))\n",
        ('tests/test_reliability.py::test_nonfinite_step_leaves_the_state_unchanged',)),
    Breakage(
        'finite-check-drops-last-bucket', 'lm/steps.py',
        "    for x in (*xs, None):\n",
        "    for x in xs:  # BREAKAGE: the last bucket is never reduced.\n",
        ('tests/test_reliability.py::'
         'test_the_finiteness_check_reads_each_shard_and_gathers_nothing',)),
    Breakage(
        'finite-check-without-shardings', 'lm/train.py',
        "                          ema_decay=c.train.ema_decay, shardings=self.state_shardings),\n",
        "                          ema_decay=c.train.ema_decay),  # BREAKAGE: gathers to check.\n",
        ('tests/test_reliability.py::'
         'test_the_trainer_checks_finiteness_on_each_devices_own_shards',)),
    Breakage(
        'per-device-batchnorm', 'lm/cnn.py',
        "def _batch_norm(train: bool, dtype: Any) -> nn.BatchNorm:\n"
        "  return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,\n"
        "                      epsilon=_BN_EPSILON, dtype=dtype)\n",
        "def _batch_norm(train: bool, dtype: Any) -> nn.Module:\n"
        "  return BatchNorm(train=train, dtype=dtype)\n"
        "\n"
        "\n"
        "class BatchNorm(nn.Module):\n"
        "  \"\"\"BREAKAGE: statistics of each device's slice of the batch, as pmap without\n"
        "  axis_name computes them; on one device it splits the batch the same way.\"\"\"\n"
        "  train: bool\n"
        "  dtype: Any\n"
        "\n"
        "  @nn.compact\n"
        "  def __call__(self, x):\n"
        "    c = x.shape[-1]\n"
        "    scale = self.param('scale', nn.initializers.ones, (c,))\n"
        "    bias = self.param('bias', nn.initializers.zeros, (c,))\n"
        "    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,)))\n"
        "    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,)))\n"
        "    if not self.train:\n"
        "      y = (x - ra_mean.value) * jax.lax.rsqrt(ra_var.value + _BN_EPSILON)\n"
        "      return (y * scale + bias).astype(self.dtype)\n"
        "    x_g = x.astype(jnp.float32).reshape(jax.device_count(), -1, *x.shape[1:])\n"
        "    axes = tuple(range(1, x_g.ndim - 1))\n"
        "    mean, var = x_g.mean(axes, keepdims=True), x_g.var(axes, keepdims=True)\n"
        "    if not self.is_initializing():\n"
        "      m = 1 - _BN_MOMENTUM\n"
        "      ra_mean.value = _BN_MOMENTUM * ra_mean.value + m * mean.mean(0).reshape(c)\n"
        "      ra_var.value = _BN_MOMENTUM * ra_var.value + m * var.mean(0).reshape(c)\n"
        "    y = ((x_g - mean) * jax.lax.rsqrt(var + _BN_EPSILON)).reshape(x.shape)\n"
        "    return (y * scale + bias).astype(self.dtype)\n",
        ('tests/test_cnn.py::test_batch_norm_statistics_are_those_of_the_global_batch',)),
    Breakage(
        'resumable-data-batch-seed', 'lm/train.py',
        "'train.on_nan', 'train.max_rollbacks', 'data.data_dir',\n",
        "'train.on_nan', 'train.max_rollbacks', 'data.', 'train.batch_size',\n"
        "                      'train.grad_accum_steps', 'seed',  # BREAKAGE\n",
        ('tests/test_reliability.py::test_config_drift_refuses_every_field_that_changes_the_run',)),
    Breakage(
        'sample-ignores-temperature', 'lm/sample.py',
        "  logits_BxV = logits_BxV / temperature\n",
        "  logits_BxV = logits_BxV  # BREAKAGE: the temperature is ignored.\n",
        ('tests/test_sample.py::test_sampling_draws_from_the_softmax_at_the_temperature',)),
    Breakage(
        'grad-accum-sums', 'lm/steps.py',
        "    loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps, sums)\n",
        "    loss, metrics = jax.tree.map(lambda x: x / grad_accum_steps, sums[:2])\n"
        "    grads = sums[2]  # BREAKAGE: the micro-batch gradients summed, not averaged.\n",
        ('tests/test_train.py::test_gradient_accumulation_matches_one_big_batch',)),
    Breakage(
        'skipped-steps-not-read', 'lm/train.py',
        "      self._skipped_steps = json.load(open(path)) if os.path.exists(path) else []\n",
        "      self._skipped_steps = []  # BREAKAGE: skipped_steps.json is not read on restart.\n",
        ('tests/test_reliability.py::'
         'test_a_restart_after_a_rollback_trains_on_the_same_spare_batch',)),
    Breakage(
        'golden-adamw-without-weight-decay', 'lm/optim.py',
        "    return optax.adamw(lr, optim_cfg.b1, optim_cfg.b2, optim_cfg.eps, weight_decay=wd,\n",
        "    return optax.adamw(lr, optim_cfg.b1, optim_cfg.b2, optim_cfg.eps, weight_decay=0.0,\n",
        ('tests/test_train.py::test_golden_first_steps',)),
    # --- EMA, losses, the command line ---------------------------------------------------------
    Breakage(
        'eval-ignores-ema', 'lm/train.py',
        "    params = state.ema_params if state.ema_params is not None else state.params\n",
        "    params = state.params  # BREAKAGE: the EMA is kept but never evaluated.\n",
        ('tests/test_train.py::test_ema_is_what_eval_and_sampling_use',)),
    Breakage(
        'sample-ignores-ema', 'lm/checkpoint.py',
        "  params = state['ema_params'] if state.get('ema_params') is not None else "
        "state['params']\n",
        "  params = state['params']  # BREAKAGE: lm.sample ignores the EMA.\n",
        ('tests/test_train.py::test_ema_is_what_eval_and_sampling_use',)),
    Breakage(
        'ema-decay-reversed', 'lm/steps.py',
        "    ema = optax.incremental_update(params, ema, 1.0 - ema_decay)\n",
        "    ema = optax.incremental_update(params, ema, ema_decay)  # BREAKAGE: swapped.\n",
        ('tests/test_train.py::test_ema_is_what_eval_and_sampling_use',)),
    Breakage(
        'label-smoothing-ignored', 'lm/losses.py',
        "    targets_xK = optax.smooth_labels(jax.nn.one_hot(labels, logits_xK.shape[-1]),\n"
        "                                     label_smoothing)\n",
        "    targets_xK = jax.nn.one_hot(labels, logits_xK.shape[-1])  # BREAKAGE: not smoothed.\n",
        ('tests/test_losses.py::test_cross_entropy_with_label_smoothing_is_its_formula',)),
    Breakage(
        'divergence-exits-2', 'lm/main.py',
        "    _fail(str(e), code=3)\n",
        "    _fail(str(e))  # BREAKAGE: divergence exits 2, like bad input.\n",
        ('tests/test_main.py::test_divergence_exits_3_with_one_line_naming_the_step',)),
    # --- Tasks own the loss (lm/tasks.py) ------------------------------------------------------
    Breakage(
        'class-weights-ignored', 'lm/tasks.py',
        "    if self.class_weights_K is not None:\n"
        "      weights_B = weights_B * self.class_weights_K[labels_B]\n",
        "    # BREAKAGE: train.class_weights is read and never applied.\n",
        ('tests/test_tasks.py::test_classification_loss_weighs_each_example_by_its_class_weight',)),
    Breakage(
        'eval-loss-counts-padding', 'lm/tasks.py',
        "    total, count = losses.cross_entropy(logits_BxK, labels_B, valid_B)\n",
        "    total, count = losses.cross_entropy(logits_BxK, labels_B)  # BREAKAGE: no valid.\n",
        (_PADDED_EVAL,)),
    Breakage(
        'confusion-counts-padding', 'lm/tasks.py',
        "            'confusion': classification.confusion_matrix(preds_B, labels_B, valid_B,\n",
        "            'confusion': classification.confusion_matrix(preds_B, labels_B,  # BREAKAGE\n"
        "                                                         jnp.ones_like(valid_B),\n",
        (_PADDED_EVAL,)),
    # --- Reliability work since (read-only readers, torn lines, guards, workdir files) ---------
    Breakage(
        'reader-cleans-up', 'lm/checkpoint.py',
        "    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, "
        "create=False,\n"
        "                                           cleanup_tmp_directories=False,\n",
        "    options = ocp.CheckpointManagerOptions(create=False,  # BREAKAGE: cleans up.\n"
        "                                           cleanup_tmp_directories=True,\n",
        ('tests/test_checkpoint.py::'
         'test_reader_changes_nothing_and_reads_the_latest_complete_checkpoint',)),
    Breakage(
        'writer-keeps-torn-line', 'lm/metrics.py',
        "      cut_torn_last_line(path)\n",
        "      pass  # BREAKAGE: the next row is glued onto a torn last line.\n",
        ('tests/test_metrics.py::test_writer_cuts_a_torn_last_line_before_appending',)),
    Breakage(
        'nan-guard-loss-and-grad-only', 'lm/steps.py',
        "  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) &\n"
        "            all_finite(rest(new), None if shardings is None else rest(shardings)))\n",
        "  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # BREAKAGE: not the state.\n",
        ('tests/test_reliability.py::test_a_nan_update_from_finite_gradients_is_guarded',)),
    Breakage(
        'fresh-run-keeps-skipped-steps', 'lm/train.py',
        "    if fresh and os.path.exists(self._skipped_path()):\n"
        "      os.remove(self._skipped_path())  # A previous run's rollbacks are not this run's.\n",
        "    # BREAKAGE: a fresh run inherits an earlier run's skipped_steps.json.\n",
        ('tests/test_reliability.py::test_a_fresh_run_does_not_inherit_skipped_steps',)),
    Breakage(
        'config-json-before-restore', 'lm/train.py',
        "    state = self.compile_and_init()\n"
        "    self._write_workdir(fresh=resuming_from is None)\n",
        "    self._write_workdir(fresh=resuming_from is None)  # BREAKAGE: before the restore.\n"
        "    state = self.compile_and_init()\n",
        ('tests/test_reliability.py::test_a_failed_resume_does_not_rewrite_config_json',)),
    Breakage(
        'max-rollbacks-zero-says-on-nan-stop', 'lm/train.py',
        "    if t.on_nan == 'rollback':\n"
        "      why = f'after {rollbacks - 1} rollbacks",
        "    if t.on_nan == 'rollback' and rollbacks > 1:  # BREAKAGE: the message of #17.\n"
        "      why = f'after {rollbacks - 1} rollbacks",
        ('tests/test_reliability.py::test_max_rollbacks_zero_names_it',)),
    # --- Tasks: the loss and the data are the task's (lm/tasks.py, lm/labelled_text.py) -----
    Breakage(
        'focal-loss-ignored', 'lm/tasks.py',
        "    if t.loss == 'focal':\n",
        "    if False:  # BREAKAGE: train.loss=focal trains with cross-entropy.\n",
        ('tests/test_tasks.py::'
         'test_classification_loss_weighs_each_example_by_its_class_weight[focal]',)),
    Breakage(
        'oversample-ignored', 'lm/labelled_text.py',
        "      weights_N = 1.0 / self.class_counts[labels_N] if oversample else None\n",
        "      weights_N = None  # BREAKAGE: data.oversample is read and never applied.\n",
        ('tests/test_text_classification.py::test_oversampled_batches_are_about_half_spam',)),
    # --- Transfer learning (lm/transfer.py, lm/optim.py's parameter groups) ------------------
    Breakage(
        'init-loads-nothing', 'lm/train.py',
        "      state = transfer.load(state, self.abstract_state, self.config.init, self.is_main)\n",
        "      pass  # BREAKAGE: init.workdir is checked and adopted, its weights never loaded.\n",
        ('tests/test_transfer.py::test_lm_trunk_seeds_the_classifier_and_the_report_says_so',)),
    Breakage(
        'init-skips-a-mismatched-shape', 'lm/transfer.py',
        "          raise ConfigError(\n"
        "              f'init: {path} is {tuple(m.shape)} in {workdir} but {here} is '\n",
        "          skipped.append(path)  # BREAKAGE: a silent partial restore.\n"
        "          continue\n"
        "          raise ConfigError(\n"
        "              f'init: {path} is {tuple(m.shape)} in {workdir} but {here} is '\n",
        ('tests/test_transfer.py::'
         'test_a_mismatched_tree_is_refused_naming_the_path_and_shapes',)),
    Breakage(
        'init-drops-an-unused-leaf', 'lm/transfer.py',
        "        if here not in target:\n",
        "        if here not in target:\n"
        "          continue  # BREAKAGE: a source leaf with no place here is dropped silently.\n",
        ('tests/test_transfer.py::test_an_unused_source_leaf_is_refused_unless_skipped',)),
    Breakage(
        'init-skip-ignored', 'lm/transfer.py',
        "  skip = [re.compile(p.strip()) for p in init_cfg.skip.split(',') if p.strip()]\n",
        "  skip = []  # BREAKAGE: init.skip is read and never applied.\n",
        ('tests/test_transfer.py::test_an_unused_source_leaf_is_refused_unless_skipped',)),
    Breakage(
        'init-leaves-batchnorm-statistics', 'lm/transfer.py',
        "      source = {**_flat(meta[weights], 'params/'), "
        "**_flat(meta.get('model_state') or {}, '')}\n",
        "      source = _flat(meta[weights], 'params/')  # BREAKAGE: no BatchNorm statistics.\n",
        ('tests/test_transfer.py::test_cnn_weights_and_batchnorm_statistics_load',)),
    Breakage(
        'freeze-does-not-freeze', 'lm/optim.py',
        "    groups = {'base': _optimizer(optim_cfg, lr), 'frozen': optax.set_to_zero()}\n",
        "    groups = {'base': _optimizer(optim_cfg, lr),  # BREAKAGE: frozen ones train.\n"
        "              'frozen': _optimizer(optim_cfg, lr)}\n",
        ('tests/test_transfer.py::'
         'test_frozen_parameters_do_not_move_and_have_no_optimizer_state',)),
    Breakage(
        'lr-mults-ignored', 'lm/optim.py',
        "      groups[f'lr_{i}'] = _optimizer(optim_cfg, scaled(mult))\n",
        "      groups[f'lr_{i}'] = _optimizer(optim_cfg, lr)  # BREAKAGE: no multiplier.\n",
        ('tests/test_transfer.py::test_lr_groups_and_unfreezing',)),
    Breakage(
        'unfreeze-at-ignored', 'lm/optim.py',
        "      groups['thaw'] = _optimizer(optim_cfg, "
        "lambda step: jnp.where(step < n, 0.0, lr(step)))\n",
        "      groups['thaw'] = optax.set_to_zero()  # BREAKAGE: never unfrozen.\n",
        ('tests/test_transfer.py::test_lr_groups_and_unfreezing',)),
    Breakage(
        'layer-decay-upside-down', 'lm/optim.py',
        "            optim_cfg, scaled(optim_cfg.layer_decay ** (num_layers + 1 - k)))\n",
        "            optim_cfg, scaled(optim_cfg.layer_decay ** k))  # BREAKAGE: upside down.\n",
        ('tests/test_transfer.py::test_layer_decay_scales_each_block',)),
)


@dataclasses.dataclass
class Outcome:
  name: str
  status: str  # 'caught', 'SURVIVED' or 'ERROR'
  detail: str  # The failing test, or why it survived or errored.
  seconds: float


def _copy_repository(dest: str) -> str:
  """<dest>/repo with the copied parts, and <dest>/shared linked as the real ../shared is."""
  repo = os.path.join(dest, 'repo')
  os.makedirs(repo)
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc', '.pytest_cache')
  for name in COPIED:
    src = os.path.join(ROOT, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(repo, name), ignore=ignore)
    elif os.path.exists(src):
      shutil.copy2(src, os.path.join(repo, name))
  shared = os.path.realpath(os.path.join(ROOT, '..', 'shared'))
  if os.path.isdir(shared):
    os.symlink(shared, os.path.join(dest, 'shared'))
  return repo


def _apply(repo: str, b: Breakage) -> str | None:
  """Applies the edit; returns why it cannot be applied, or None."""
  path = os.path.join(repo, b.file)
  if not os.path.exists(path):
    return f'{b.file} does not exist: the code moved; update the breakage'
  with open(path) as f:
    text = f.read()
  count = text.count(b.old)
  if count != 1:
    where = 'no longer occurs' if count == 0 else f'occurs {count} times'
    return f'the text to replace {where} in {b.file}: the code moved; update the breakage'
  with open(path, 'w') as f:
    f.write(text.replace(b.old, b.new))
  return None


def _pytest(repo: str, tests, cache_dir: str) -> tuple[int, str]:
  env = {**os.environ, 'LM_TESTS_EXPECTED_ROOT': repo,
         # Compiled programs are shared between the runs; a broken one compiles anew.
         'JAX_COMPILATION_CACHE_DIR': cache_dir,
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
  env.pop('PYTHONPATH', None)
  cmd = [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider', *tests]
  try:
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired as e:
    out = (e.stdout or b'').decode(errors='replace') if isinstance(e.stdout, bytes) else (
        e.stdout or '')
    return -1, out + f'\ntimed out after {TIMEOUT_S} s'
  return result.returncode, result.stdout + result.stderr


def _failed_tests(output: str) -> list[str]:
  """Test ids pytest's short summary lists as FAILED or ERROR (in a fixture of the test)."""
  return re.findall(r'^(?:FAILED|ERROR) (\S+::\S+)', output, flags=re.M)


def _tail(output: str, lines: int = 25) -> str:
  return '\n'.join(output.strip().splitlines()[-lines:])


def run_breakage(b: Breakage, workdir: str, cache_dir: str, verbose: bool) -> Outcome:
  start = time.time()
  repo = _copy_repository(os.path.join(workdir, b.name))
  problem = _apply(repo, b)
  if problem:
    return Outcome(b.name, 'ERROR', problem, time.time() - start)
  code, output = _pytest(repo, b.tests, cache_dir)
  seconds = time.time() - start
  failed = _failed_tests(output)
  if verbose or code not in (0, 1):
    print(_tail(output), flush=True)
  if code == 1 and failed:
    return Outcome(b.name, 'caught', ', '.join(failed), seconds)
  if code == 0:
    return Outcome(b.name, 'SURVIVED', 'every named test passed', seconds)
  return Outcome(b.name, 'ERROR', f'pytest exit {code}: {_tail(output, 1)}', seconds)


def baseline(breakages, workdir: str, cache_dir: str) -> tuple[bool, str, float]:
  """The named tests on an unbroken copy: all must pass."""
  start = time.time()
  repo = _copy_repository(os.path.join(workdir, 'baseline'))
  tests = list(dict.fromkeys(t for b in breakages for t in b.tests))
  code, output = _pytest(repo, tests, cache_dir)
  return code == 0, output, time.time() - start


def _table(outcomes) -> str:
  lines = ['| breakage | caught by | seconds |', '| --- | --- | ---: |']
  for o in outcomes:
    shown = o.detail if o.status == 'caught' else f'**{o.status}**: {o.detail}'
    lines.append(f'| {o.name} | {shown} | {o.seconds:.0f} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m tests.breakages', description=__doc__.split(
      '\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--only', action='append', metavar='NAME', default=[],
                      help='run only this breakage (repeatable)')
  parser.add_argument('--list', action='store_true', help='list the breakages and exit')
  parser.add_argument('--no_baseline', action='store_true',
                      help='skip the run of the named tests on the unbroken code')
  parser.add_argument('--keep', action='store_true', help='keep the broken copies (path printed)')
  parser.add_argument('-v', '--verbose', action='store_true', help="print pytest's output tail")
  parser.add_argument('--jax_cache', default=os.path.join(tempfile.gettempdir(),
                                                          'lm-breakages-jax-cache'),
                      help="JAX's compilation cache, kept between runs ('' = a fresh one)")
  args = parser.parse_args(argv)

  names = [b.name for b in BREAKAGES]
  assert len(set(names)) == len(names), 'two breakages share a name'
  if args.list:
    for b in BREAKAGES:
      print(f'{b.name}  ({b.file})\n    ' + '\n    '.join(b.tests))
    return 0
  unknown = [n for n in args.only if n not in names]
  if unknown:
    print(f'error: no breakage named {", ".join(unknown)}; --list shows them', file=sys.stderr)
    return 2
  chosen = [b for b in BREAKAGES if not args.only or b.name in args.only]
  missing = [m for m in ('jax', 'pytest') if importlib.util.find_spec(m) is None]
  if missing:
    print(f'error: {sys.executable} has no {", ".join(missing)}; run this with the project\'s '
          'venv (. .venv/bin/activate)', file=sys.stderr)
    return 2

  workdir = tempfile.mkdtemp(prefix='lm-breakages-')
  cache_dir = args.jax_cache or os.path.join(workdir, 'jax-cache')
  started = time.time()
  try:
    if not args.no_baseline:
      print(f'baseline: the {len({t for b in chosen for t in b.tests})} named tests on the '
            'unbroken code ...', flush=True)
      ok, output, seconds = baseline(chosen, workdir, cache_dir)
      if not ok:
        print(_tail(output, 40))
        print(f'error: the named tests do not all pass on the unbroken code ({seconds:.0f} s); '
              'fix them first, or a breakage "caught" by them means nothing', file=sys.stderr)
        return 1
      print(f'baseline: passed in {seconds:.0f} s', flush=True)
    outcomes = []
    for b in chosen:
      outcome = run_breakage(b, workdir, cache_dir, args.verbose)
      print(f'{outcome.name}: {outcome.status} ({outcome.detail}) in {outcome.seconds:.0f} s',
            flush=True)
      outcomes.append(outcome)
  finally:
    if args.keep:
      print(f'copies kept in {workdir}')
    else:
      shutil.rmtree(workdir, ignore_errors=True)
  print()
  print(_table(outcomes))
  bad = [o for o in outcomes if o.status != 'caught']
  print(f'\n{len(outcomes) - len(bad)} of {len(outcomes)} breakages caught in '
        f'{time.time() - started:.0f} s' + (f'; {len(bad)} not: ' +
                                            ', '.join(o.name for o in bad) if bad else ''))
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main())
