"""The training loop: build, resume, train, evaluate, checkpoint, report.

`train_and_evaluate(config, workdir)` is what `launch.py` calls. It is safe to call again on the
same workdir at any time: it resumes from the latest checkpoint (exactly: the data order,
augmentation and RNG are functions of the seed, the step and the example index) or, if the run
finished, returns the saved results.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from selfkd_jax import data as data_lib
from selfkd_jax import models
from selfkd_jax.methods import table_bytes
from selfkd_jax.metrics import calibration_bins, classification_metrics
from selfkd_jax.train import config_check, optim, parallel, run_log, teacher as teacher_lib
from selfkd_jax.train.checkpoint import Checkpointer, error_summary
from selfkd_jax.train.method_factory import (MethodContext, model_fields, needs_network_teacher,
                                             needs_partners, setup_method)
from selfkd_jax.train.state import initial_state_fn
from selfkd_jax.train.step import (EXIT_PREFIX, Augmentation, make_eval_step, make_refresh_step,
                                   make_train_step)
from selfkd_jax.train.workdir_files import TRAIN_LABELS_FILE
from selfkd_jax.train.workdir_lock import WorkdirLock, prepare_workdir


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite; the message names the step."""


class PassStopped(Exception):
  """A stop signal arrived during an evaluation or refresh pass, which was abandoned.

  `state`: for a refresh, the state as far as the pass got (the one passed in was donated).
  """

  def __init__(self, signum: int, state=None):
    super().__init__(signal.Signals(signum).name)
    self.signum, self.state = signum, state


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint was saved before raising.

  `exit_status` is the shell's convention for that signal: 143 (SIGTERM), 130 (SIGINT).
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_status = 128 + signum


def select_devices(config, devices=None) -> list:
  """The first `config.num_devices` of `devices` (default: `jax.devices()`); 0 = all."""
  devices = jax.devices() if devices is None else list(devices)
  wanted = config.get("num_devices", 0)
  if not config_check.is_int(wanted) or not 0 <= wanted <= len(devices):
    raise config_check.ConfigError(
        f"config.num_devices={wanted!r} must be 0 (every visible device) or 1..{len(devices)} "
        f"({len(devices)} device{'s are' if len(devices) > 1 else ' is'} visible)")
  return devices[:wanted or len(devices)]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopSignals:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks between steps, so that a
  stop request saves a checkpoint first and a save is never cut short.

  With several processes the save is collective, so all must stop at the same step even when
  the signal reached one (a preemption notice to one host): `agreed` shares the flags at steps
  every process checks (log, epoch and checkpoint steps), and every process acts on the result.
  One process checks its own flag after every step.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals need the main thread
      self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def agreed(self, at_check_step: bool) -> int | None:
    """The signal to stop for now (the same on every process), or None."""
    if jax.process_count() == 1:
      return self.signum
    if not at_check_step:
      return None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
    signum = int(np.max(flags))  # SIGTERM (15) wins over SIGINT (2)
    return signum or None

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


class Experiment:
  """Everything about a run that is not state: data, model, method, optimizer, compiled steps."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.workdir = workdir
    self.devices = select_devices(config)
    config_check.check_config(config, len(self.devices))

    try:
      self.train_source, self.test_source, self.info = data_lib.load_splits(
          config.data.name, data_dir=config.data.dir or None,
          limit_train=config.data.limit_train or None,
          image_size=config.data.get("image_size", 0),
          resize_size=config.data.get("resize_size", 0))
    except data_lib.ImageSizeError as e:  # image_size missing or not for this dataset
      raise config_check.ConfigError(str(e)) from None
    config_check.check_against_dataset(config, self.info)
    # Grain worker processes for sources that decode and crop on the host (0 for the others).
    self.num_processes = data_lib.num_processes_for(
        config.data.get("workers", -1), self.train_source, config.data.get("reader", "auto"))
    self.num_train = len(self.train_source)
    self.num_classes = self.info.num_classes
    self.steps_per_epoch = data_lib.steps_per_epoch(self.num_train, config.batch_size)
    self.total_steps = self.steps_per_epoch * config.num_epochs

    self.runner = parallel.make_runner(config.parallel, self.devices)
    # The backbone alone: what evaluation reports and a checkpoint's 'backbone' holds.
    self.backbone = models.model_from_config(config.model, num_classes=self.num_classes,
                                             bn_axis_name=parallel.AXIS)
    self.tx, self.schedule = optim.make_optimizer(config.optimizer, self.steps_per_epoch,
                                                  config.num_epochs)
    # The method, and the model it trains: the backbone with the method's heads, if any.
    setup = self._setup_method()
    self.method, self.model, self.eval_model = setup.method, setup.model, setup.eval_model
    self.model_inputs = setup.model_inputs
    self.augmentation = _augmentation(config.data, self.info)
    self.teacher = None  # a frozen network teacher, attached by `attach_teacher`
    self.teacher_variables = {}

  def attach_teacher(self, teacher: teacher_lib.Teacher) -> None:
    self.teacher = teacher
    self.teacher_variables = self.runner.put_frozen(teacher.variables)

  def _setup_method(self):
    config = self.config
    eval_backbone = self.backbone.clone(bn_axis_name=None)
    context = MethodContext(
        num_examples=self.num_train, num_classes=self.num_classes,
        num_epochs=config.num_epochs, steps_per_epoch=self.steps_per_epoch,
        dataset=config.data.name, data_dir=config.data.dir, seed=config.seed,
        log=_log_line, **self._model_fields(eval_backbone))
    try:
      return setup_method(config.method, context, self.backbone, eval_backbone,
                          bn_axis_name=parallel.AXIS)
    except ValueError as e:  # a value the method's constructor refuses: a config error
      raise config_check.ConfigError(f"config.method ({config.method.name}): {e}") from None

  def _model_fields(self, eval_backbone) -> dict:
    """The backbone's output sizes, from a trace (no compile, no memory); images too small for
    the model's pooling fail here, refused as a configuration error before anything is
    written."""
    try:
      return model_fields(eval_backbone, self.info.image_shape)
    except Exception as e:  # pylint: disable=broad-except  (shape errors come in many types)
      shape = "x".join(map(str, self.info.image_shape))
      raise config_check.ConfigError(
          f"config.model.name={self.config.model.name!r} cannot take the {shape} images of "
          f"{self.config.data.name!r} ({error_summary(e, 200)}); use a model made for "
          "images of this size") from None

  # -- state ---------------------------------------------------------------------------------

  def init_fn(self):
    """Pure function building the initial global-layout state (jitted with out_shardings)."""
    return initial_state_fn(model=self.eval_model, method=self.method, tx=self.tx,
                            image_shape=self.info.image_shape, seed=self.config.seed,
                            num_devices=len(self.devices))

  def initial_state(self, checkpointer: Checkpointer):
    init = self.init_fn()
    if checkpointer.latest_step() is not None:
      abstract = self.runner.abstract_state(init)
      state, _ = checkpointer.restore(abstract, adapt=self.runner.table_rows_adapter(abstract))
      return state, True
    return self.runner.init_state(init), False

  # -- compiled steps ------------------------------------------------------------------------

  def compile(self, abstract_state):
    axis = parallel.AXIS
    train_body = make_train_step(model=self.model, tx=self.tx, method=self.method,
                                 model_inputs=self.model_inputs,
                                 steps_per_epoch=self.steps_per_epoch,
                                 augmentation=self.augmentation, schedule=self.schedule,
                                 axis_name=axis,
                                 teacher_model=self.teacher.model if self.teacher else None)
    self.trace_count = 0

    def counted_train_body(state, batch, teacher_variables):
      self.trace_count += 1  # runs at trace time only: counts compilations
      return train_body(state, batch, teacher_variables)

    self.train_step = self.runner.compile_train(counted_train_body, abstract_state)
    self.eval_step = self.runner.compile_eval(
        make_eval_step(model=self.eval_model, augmentation=self.augmentation), abstract_state)
    self.refresh_step = None
    if self.method.refresh is not None:
      self.refresh_step = self.runner.compile_refresh(
          make_refresh_step(model=self.eval_model, method=self.method,
                            augmentation=self.augmentation, axis_name=axis), abstract_state)

  # -- passes over data ----------------------------------------------------------------------

  def eval_batch_size(self) -> int:
    size = self.config.get("eval_batch_size", 0) or self.config.batch_size
    return size

  def _sequential(self, source):
    batches = data_lib.eval_batches(source, global_batch_size=self.eval_batch_size(),
                                    reader=self.config.data.get("reader", "auto"),
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    num_processes=self.num_processes)
    return parallel.prefetch(batches, self.runner.put_batch)

  def evaluate(self, state, should_stop: Callable[[], int | None] | None = None
               ) -> dict[str, float]:
    """Metrics over the whole test split, identical for any number of devices or hosts.

    `should_stop()`, if given, is asked after every batch (as often on every process) and
    returns a signal number to abandon the pass: `PassStopped`.
    """
    stats, masks = [], []
    for batch in self._sequential(self.test_source):
      stats.append(self.runner.fetch(self.eval_step(state, batch)))
      masks.append(self.runner.fetch(batch["mask"]))
      signum = should_stop() if should_stop is not None else None
      if signum:
        raise PassStopped(signum)
    keep = np.concatenate(masks) > 0
    merged = {k: np.concatenate([s[k] for s in stats])[keep] for k in stats[0]}
    exits = {k[len(EXIT_PREFIX):]: float(np.mean(merged.pop(k))) for k in list(merged)
             if k.startswith(EXIT_PREFIX)}
    bins = calibration_bins(merged["confidence"], merged["correct"])
    # The 15-bin sums behind ECE, kept for reliability diagrams (they add up across runs).
    metrics = {**classification_metrics(merged),
               "calibration_bins": {k: v.tolist() for k, v in bins.items()}}
    if exits:  # auxiliary exits (BYOT, LSSKD): top-1 of each and of their ensemble
      metrics["exit_top1"] = exits
    return metrics

  def refresh(self, state, should_stop: Callable[[], int | None] | None = None):
    """The method's end-of-epoch pass over the training set; `should_stop` as in `evaluate`.

    Every row it writes depends only on the model's variables and the example, so a pass cut
    short is simply done again (resume does).
    """
    for batch in self._sequential(self.train_source):
      state = self.refresh_step(state, batch)
      signum = should_stop() if should_stop is not None else None
      if signum:
        raise PassStopped(signum, state)
    return state


def _log_line(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _augmentation(data_config, info) -> Augmentation:
  crop = info.crop_padding if data_config.crop_padding < 0 else data_config.crop_padding
  flip = info.flip if data_config.flip < 0 else bool(data_config.flip)
  extra = {"crop_fill": int(data_config.get("crop_fill", 0)),
           "rotation_degrees": float(data_config.get("rotation_degrees", 0.0)),
           "autoaugment": data_config.get("autoaugment", "none"),
           "cutout": int(data_config.get("cutout", 0)),
           "color_jitter": float(data_config.get("color_jitter", 0.0)),
           "lighting": float(data_config.get("lighting", 0.0))}
  if not data_config.augment:
    crop, flip = 0, False
    extra.update(rotation_degrees=0.0, autoaugment="none", cutout=0, color_jitter=0.0,
                 lighting=0.0)
  # A recipe may normalise with its script's constants instead of the dataset's statistics.
  mean = tuple(data_config.get("mean", ())) or tuple(info.mean)
  std = tuple(data_config.get("std", ())) or tuple(info.std)
  return Augmentation(crop_padding=int(crop), flip=bool(flip), mean=mean, std=std, **extra)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if possible) and returns the results dict.

  Every check that needs no workdir runs first (nothing is written for a refused config);
  then the run takes the workdir's lock for its whole length (`workdir_lock`).
  """
  experiment = Experiment(config, workdir)
  with WorkdirLock.acquire(prepare_workdir(workdir)):
    return _train_locked(experiment, config, workdir)


def _train_locked(experiment: Experiment, config, workdir: str) -> dict[str, Any]:
  config_check.check_workdir(config, workdir)
  results_path = os.path.join(workdir, run_log.RESULTS_FILE)
  if os.path.exists(results_path):
    try:
      with open(results_path) as f:
        return json.load(f)
    except (OSError, ValueError) as e:  # derived data: finish the run again from checkpoints
      _log_line(f"{results_path} is unreadable ({type(e).__name__}); finishing the run again "
                "from its checkpoints")

  log = run_log.RunLog(workdir)
  if jax.process_index() == 0:
    run_log.write_json_atomic(os.path.join(workdir, config_check.CONFIG_FILE),
                              json.loads(config.to_json()))
  checkpointer = Checkpointer(workdir, keep=config.get("keep_checkpoints", 2), log=_log_line)
  best_checkpointer = (teacher_lib.best_checkpointer(workdir, log=_log_line)
                       if config.get("keep_best_checkpoint", False) else None)
  try:
    if needs_network_teacher(config.method):
      experiment.attach_teacher(teacher_lib.prepare_teacher(
          config, workdir, num_classes=experiment.num_classes,
          resuming=checkpointer.latest_step() is not None, train=train_and_evaluate,
          log=_log_line))
    return _train(experiment, checkpointer, log, best_checkpointer)
  finally:
    checkpointer.close()
    if best_checkpointer is not None:
      best_checkpointer.close()
    log.close()


def _train(experiment: Experiment, checkpointer: Checkpointer, log: run_log.RunLog,
           best_checkpointer: Checkpointer | None = None):
  config, runner = experiment.config, experiment.runner
  state, resumed = experiment.initial_state(checkpointer)
  start_step = int(jax.device_get(state.step))
  steps_per_epoch, total_steps = experiment.steps_per_epoch, experiment.total_steps
  if resumed:
    _log_line(f"Resuming from step {start_step} ({checkpointer.directory})")
  experiment.compile(state)
  state = runner.from_global(state)

  completed_epochs = start_step // steps_per_epoch
  history = log.read_eval_history(completed_epochs) if resumed else []
  wall_before = history[-1]["wall_s"] if history else 0.0
  started = time.time()
  train_time, train_images = 0.0, 0
  checkpoint_every = config.get("checkpoint_every_steps", 0) or steps_per_epoch
  log_every = max(1, config.get("log_every_steps", 50))
  pending: list[tuple[int, Any]] = []

  def flush_metrics():
    """Fetches pending step metrics (one host sync), stops on a non-finite loss, logs."""
    if not pending:
      return None
    fetched = runner.metrics_to_host([m for _, m in pending])
    for (step, _), values in zip(pending, fetched):
      if not math.isfinite(float(values["loss"])):
        last_good = checkpointer.latest_step()
        kept = ("no checkpoint was written yet" if last_good is None else
                f"the last good checkpoint is step {last_good} in {checkpointer.directory}")
        raise NonFiniteLossError(
            f"non-finite loss ({float(values['loss'])}) at step {step} (epoch "
            f"{step // steps_per_epoch + 1} of {config.num_epochs}); {kept}; lower "
            "config.optimizer.learning_rate, or check the data's labels (a label outside "
            "0..C-1 gives a NaN loss)")
    last_step, last = pending[-1][0], fetched[-1]
    log.write("train", last_step + 1, last)
    pending.clear()
    return last

  def save(step):
    flush_metrics()  # never checkpoint a state whose loss was not checked
    checkpointer.save(step, runner.to_global(state))

  def save_and_stop(step, signum):
    if not (resumed and step == start_step):  # else: stopped again while finishing its end
      save(step)
    raise Preempted(f"{signal.Signals(signum).name}: saved a checkpoint at step {step}; "
                    "run the same command to resume", signum)

  def end_epoch(step, stop):
    """The epoch's end: the method's refresh pass, then the evaluation when due (history entry,
    best checkpoint, epoch line). A stop during either abandons it, saves `step` and ends the
    run; resuming at `step` without its evaluation does the epoch's end again (`resume_end`)."""
    nonlocal state
    if experiment.refresh_step is not None:
      try:
        state = experiment.refresh(state, should_stop=lambda: stop.agreed(True))
      except PassStopped as e:
        state = e.state
        save_and_stop(step, e.signum)
    if evaluation_due(step):
      evaluate_epoch(step, stop)

  def resume_end(step, stop):
    """At an epoch boundary, the end a stop cut short: an epoch that was evaluated has ended."""
    epoch = step // steps_per_epoch
    if step > 0 and step % steps_per_epoch == 0 and not any(e["epoch"] == epoch for e in history):
      if experiment.refresh_step is not None or evaluation_due(step):
        _log_line(f"Doing the end of epoch {epoch} again: no evaluation of it is recorded")
        end_epoch(step, stop)

  def evaluate_epoch(step, stop):
    epoch = step // steps_per_epoch
    try:
      metrics_now = experiment.evaluate(state, should_stop=lambda: stop.agreed(True))
    except PassStopped as e:
      save_and_stop(step, e.signum)
    entry = {"epoch": epoch, "step": step,
             "wall_s": wall_before + time.time() - started, **metrics_now}
    if best_checkpointer is not None and all(
        entry["top1"] > earlier["top1"] for earlier in history):
      # Before the regular save: a stop in between replays this epoch and saves again.
      best_checkpointer.save(step, teacher_lib.variables_of(runner.to_global(state)))
    history.append(entry)
    log.write("eval", step, {f"test_{k}": v for k, v in metrics_now.items()})
    log.write_eval_history(history)
    _log_line(_epoch_line(epoch, config.num_epochs, last_values, metrics_now))

  def evaluation_due(step):
    return (step // steps_per_epoch % config.get("eval_every_epochs", 1) == 0
            or step == total_steps)

  partners = False
  if needs_partners(config.method):  # every label, read once per workdir (see the function)
    partners = data_lib.same_class_partners(data_lib.cached_source_labels(
        experiment.train_source, os.path.join(experiment.workdir, TRAIN_LABELS_FILE),
        write=jax.process_index() == 0), seed=config.seed)
  batches = data_lib.TrainBatches(
      experiment.train_source, seed=config.seed, global_batch_size=config.batch_size,
      start_step=start_step, num_steps=total_steps, process_index=jax.process_index(),
      process_count=jax.process_count(), reader=config.data.get("reader", "auto"),
      partners=partners, num_processes=experiment.num_processes)
  device_batches = parallel.prefetch(iter(batches), runner.put_batch)
  progress = _progress_bar(total_steps, start_step, config)
  last_values = None
  with _StopSignals() as stop:
    try:
      if resumed:
        resume_end(start_step, stop)
      step = window_start = start_step
      tick = time.time()
      for batch in device_batches:
        state, metrics = experiment.train_step(state, batch, experiment.teacher_variables)
        pending.append((step, metrics))
        step += 1
        if step % log_every == 0 or step % steps_per_epoch == 0:
          last_values = flush_metrics() or last_values
          now = time.time()
          if window_start > start_step:  # the first window includes compilation
            train_time += now - tick
            train_images += (step - window_start) * config.batch_size
          tick, window_start = now, step
          _update_progress(progress, step, last_values, train_images, train_time)
        if step % steps_per_epoch == 0:
          end_epoch(step, stop)
          tick = time.time()
        # After the epoch's end, so that a checkpoint at an epoch boundary holds it unless a
        # stop cut it short (then resume_end finishes it).
        at_check_step = (step % log_every == 0 or step % steps_per_epoch == 0
                         or step % checkpoint_every == 0 or step == total_steps)
        signum = stop.agreed(at_check_step)
        if signum:
          save_and_stop(step, signum)
        if step % checkpoint_every == 0 or step == total_steps:
          save(step)
    finally:
      batches.close()
      if progress is not None:
        progress.close()

  final_state = runner.to_global(state)
  results = _results(experiment, history, final_state, wall_before + time.time() - started,
                     train_images / train_time if train_time > 0 else None)
  log.write_results(results)
  return results


def _results(experiment, history, state, wall_s, images_per_s) -> dict[str, Any]:
  config = experiment.config
  final = history[-1]
  best = max(history, key=lambda e: e["top1"])
  return {
      "test_top1": final["top1"], "test_top5": final["top5"], "test_nll": final["nll"],
      "test_ece": final["ece"], "test_ece_10bins": final["ece_10bins"],
      "test_aurc": final["aurc"], "best_test_top1": best["top1"], "best_epoch": best["epoch"],
      "test_calibration_bins": final.get("calibration_bins"),
      **({"test_exit_top1": final["exit_top1"]} if "exit_top1" in final else {}),
      "epochs": final["epoch"], "wall_s": wall_s, "images_per_s": images_per_s,
      "method": config.method.name, "model": config.model.name, "dataset": config.data.name,
      "seed": config.seed, "num_devices": len(experiment.devices),
      "state_bytes_per_device": table_bytes(state.method_state, len(experiment.devices)),
      # Compilations of the train step in this process (1 = no retrace across steps/epochs).
      "train_step_compilations": experiment.trace_count,
  }


def _progress_bar(total_steps, start_step, config):
  if not config.get("progress_bar", True) or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
              file=sys.stderr, disable=None)


def _update_progress(progress, step, values, images, seconds):
  if progress is None or values is None:
    return
  progress.n = step
  postfix = {"loss": f"{float(values['loss']):.4f}", "acc": f"{float(values['accuracy']):.3f}"}
  if seconds > 0:
    postfix["img/s"] = f"{images / seconds:.0f}"
  progress.set_postfix(postfix, refresh=False)
  progress.refresh()


def _epoch_line(epoch, num_epochs, train_values, test) -> str:
  train = ""
  if train_values is not None:
    train = (f"train loss {float(train_values['loss']):.4f} "
             f"acc {float(train_values['accuracy']):.4f} | ")
  exits = "".join(f" | {name} {top1:.4f}" for name, top1 in test.get("exit_top1", {}).items())
  return (f"epoch {epoch}/{num_epochs} | {train}test top1 {test['top1']:.4f} "
          f"nll {test['nll']:.4f} ece {test['ece']:.4f}{exits}")
