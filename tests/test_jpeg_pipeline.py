"""Variable-size JPEG datasets (TFDS array_record): host-side crops as torchvision's
RandomResizedCrop and Resize + CenterCrop do them with PIL, grain worker processes, config
keys, and launch.py end to end (1 vs 4 devices, SIGKILL + resume, a corrupt JPEG)."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from selfkd_jax import data
from selfkd_jax.data import image_transforms
from selfkd_jax.train import config_check
from selfkd_jax.train.default_config import base_config

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
SIZE = 32  # config.data.image_size of these tests; the eval resize is round(32 / 0.875) = 37
NUM_CLASSES, NUM_TRAIN, NUM_TEST = 10, 96, 32
GRAY_KEY, CMYK_KEY, CORRUPT_KEY = 5, 6, 37  # generation keys of special train examples


def example(split_seed: int, key: int) -> tuple[bytes, int]:
  """A JPEG (quality 90) of 40..120 x 40..120 pixels: a class colour plus noise."""
  rng = np.random.default_rng([split_seed, key])
  height, width = (int(v) for v in rng.integers(40, 121, 2))
  label = key % NUM_CLASSES
  colour = np.array([label * 25, (label * 70 + 40) % 256, 255 - label * 20])
  pixels = np.clip(colour + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
  image = Image.fromarray(pixels)
  if split_seed == 0 and key == GRAY_KEY:
    image = image.convert("L")
  elif split_seed == 0 and key == CMYK_KEY:
    image = image.convert("CMYK")
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue(), label


# Local TFDS builders (nothing to download); they register by class name when created.
class SelfkdJpegTiny(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(NUM_TRAIN, 0),
            "test": self._generate_examples(NUM_TEST, 1)}

  def _generate_examples(self, n, split_seed):
    for key in range(n):
      image, label = self.example(split_seed, key)
      yield key, {"image": image, "label": label}

  def example(self, split_seed, key):
    return example(split_seed, key)


class SelfkdJpegCorrupt(SelfkdJpegTiny):
  def example(self, split_seed, key):
    image, label = example(split_seed, key)
    return (b"\xff\xd8 not a JPEG" if (split_seed, key) == (0, CORRUPT_KEY) else image), label


class SelfkdJpegUnlabelledTest(SelfkdJpegTiny):
  """imagenet2012's layout: a labelled validation split and a test split with label -1."""

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(16, 0), "validation": self._generate_examples(8, 1),
            "test": self._unlabelled(4)}

  def _unlabelled(self, n):
    for key in range(n):
      yield key, {"image": example(2, key)[0], "label": -1}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tfds"))
  for name in ("selfkd_jpeg_tiny", "selfkd_jpeg_corrupt", "selfkd_jpeg_unlabelled_test"):
    tfds.builder(name, data_dir=directory).download_and_prepare(file_format="array_record")
  return directory


def raw_images(name, data_dir, split="train") -> list[bytes]:
  """The stored bytes, by dataset index (TFDS orders examples by a hash of their keys)."""
  source = tfds.builder(name, data_dir=data_dir).as_data_source(
      split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return [source[i]["image"] for i in range(len(source))]


@pytest.fixture(scope="module")
def splits(data_dir):
  return data.load_splits("selfkd_jpeg_tiny", data_dir=data_dir, image_size=SIZE)


# -- the crop geometry ----------------------------------------------------------------------------

def torchvision_crop_box(height, width, rng):
  """torchvision's `RandomResizedCrop.get_params` (scale (0.08, 1), ratio (3/4, 4/3)) re-derived
  with numpy's generator, drawing in torchvision's order: per attempt an area fraction and a
  log-ratio, and on success the top then the left offset; after 10 failures a centred crop."""
  for _ in range(10):
    area = height * width * rng.uniform(0.08, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = rng.integers(0, height - h + 1)
      return int(top), int(rng.integers(0, width - w + 1)), h, w
  if width / height < 3 / 4:
    w, h = width, round(width / (3 / 4))
  elif width / height > 4 / 3:
    w, h = round(height * 4 / 3), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def test_crop_boxes_follow_torchvision():
  shapes = [(375, 500), (500, 375), (100, 100), (41, 120), (120, 41), (7, 9), (1, 1)]
  for height, width in shapes:
    for seed in range(60):
      ours = image_transforms.random_resized_crop_box(height, width,
                                                      np.random.default_rng([seed, 1]))
      assert ours == torchvision_crop_box(height, width, np.random.default_rng([seed, 1]))
  # Too elongated for any attempt: the fallback, worked out by hand. 10 x 1000: the ratio
  # 100 > 4/3, so the full height and width round(10 * 4/3) = 13, centred: left (1000-13)//2.
  rng = np.random.default_rng(0)
  assert image_transforms.random_resized_crop_box(10, 1000, rng) == (0, 493, 10, 13)
  assert image_transforms.random_resized_crop_box(1000, 10, rng) == (493, 0, 13, 10)
  # Areas above the image's (scale 1.5..2) never fit: a 4:3 image, in the ratio range, is its
  # own fallback; a 5:3 one gives its full height and round(300 * 4/3) = 400 of its width.
  crop = image_transforms.random_resized_crop_box
  assert crop(300, 400, rng, scale=(1.5, 2.0)) == (0, 0, 300, 400)
  assert crop(300, 500, rng, scale=(1.5, 2.0)) == (0, 50, 300, 400)


def test_crop_scale_and_ratio_distribution():
  # A square image: the attempts that do not fit are rejected symmetrically in the ratio.
  height = width = 500
  rng = np.random.default_rng(7)
  boxes = np.array([image_transforms.random_resized_crop_box(height, width, rng)
                    for _ in range(4000)])
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  # Scale and ratio within their bounds up to the rounding of each side to whole pixels.
  assert ((w - 0.5) * (h - 0.5) <= height * width).all()
  assert ((w + 0.5) * (h + 0.5) >= 0.08 * height * width).all()
  assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all() and ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
  # The whole range is used: log-ratio symmetric about 0, areas from ~8% to ~100%.
  log_ratio = np.log(w / h)
  assert abs(log_ratio.mean()) < 0.02 and log_ratio.min() < -0.25 and log_ratio.max() > 0.25
  scale = w * h / (height * width)
  assert scale.min() < 0.09 and scale.max() > 0.95
  # Offsets uniform over the free room: centred on average.
  assert abs(np.mean((top + h / 2) / height) - 0.5) < 0.02


# -- the source --------------------------------------------------------------------------------

def test_info_and_eval_view_are_resize_and_centre_crop(splits, data_dir):
  train, test, info = splits
  assert info.variable_size and info.image_shape == (SIZE, SIZE, 3)
  assert (info.num_train, info.num_test, info.num_classes) == (NUM_TRAIN, NUM_TEST, NUM_CLASSES)
  assert info.flip is True and info.crop_padding == 0 and info.mean == (0.485, 0.456, 0.406)
  raw = raw_images("selfkd_jpeg_tiny", data_dir, "test")
  indices = np.array([3, 0, 17, 31])
  batch = test.get_batch(indices)
  assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
  np.testing.assert_array_equal(batch["index"], indices)
  for row, i in enumerate(indices):
    # torchvision's Resize(37) + CenterCrop(32) with PIL, by hand.
    image = Image.open(io.BytesIO(raw[i])).convert("RGB")
    width, height = image.size
    if width <= height:
      size = (37, int(37 * height / width))
    else:
      size = (int(37 * width / height), 37)
    resized = image.resize(size, Image.BILINEAR)
    top, left = round((size[1] - SIZE) / 2), round((size[0] - SIZE) / 2)
    expected = np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)))
    np.testing.assert_array_equal(batch["image"][row], expected)
  assert test[17]["image"].shape == (SIZE, SIZE, 3) and test[17]["index"] == 17


def test_train_view_is_a_function_of_seed_epoch_and_index(splits, data_dir):
  train, _, _ = splits
  raw = raw_images("selfkd_jpeg_tiny", data_dir)
  batch = train.get_train_batch(np.array([4, 9, 60]), seed=3, epoch=2)
  # The same examples in another batch, order and company: the same pixels.
  again = train.get_train_batch(np.array([60, 11, 4]), seed=3, epoch=2)
  np.testing.assert_array_equal(again["image"][0], batch["image"][2])
  np.testing.assert_array_equal(again["image"][2], batch["image"][0])
  # By hand: the example's generator, torchvision's box, PIL's crop and bilinear resize.
  for row, i in enumerate([4, 9, 60]):
    image = Image.open(io.BytesIO(raw[i])).convert("RGB")
    rng = np.random.default_rng([3, 2, i, image_transforms.CROP_BRANCH])
    top, left, h, w = torchvision_crop_box(image.height, image.width, rng)
    expected = image.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BILINEAR)
    np.testing.assert_array_equal(batch["image"][row], np.asarray(expected))
  # Another epoch or seed draws other crops.
  for other in (train.get_train_batch(np.array([4, 9, 60]), seed=3, epoch=3),
                train.get_train_batch(np.array([4, 9, 60]), seed=4, epoch=2)):
    assert all(not np.array_equal(a, b) for a, b in zip(other["image"], batch["image"]))
  # Same-class partners (CS-KD) draw from their own branch: another crop of the same example.
  both = train.get_train_batch(np.array([4, 4]), seed=3, epoch=2, partners_from=1)
  np.testing.assert_array_equal(both["image"][0], batch["image"][0])
  assert not np.array_equal(both["image"][1], both["image"][0])


def test_worker_processes_and_hosts_read_the_same_batches(splits):
  train, _, _ = splits
  kwargs = dict(seed=1, global_batch_size=16, start_step=4, num_steps=10)
  with data.TrainBatches(train, **kwargs) as batches:
    in_process = list(batches)
  with data.TrainBatches(train, num_processes=1, **kwargs) as batches:
    in_worker = list(batches)
  halves = []
  for host in (0, 1):
    with data.TrainBatches(train, process_index=host, process_count=2, **kwargs) as batches:
      halves.append(list(batches))
  assert len(in_process) == len(in_worker) == 6
  for step, (a, b) in enumerate(zip(in_process, in_worker), start=4):
    np.testing.assert_array_equal(
        a["index"], data.train_batch_indices(1, step, NUM_TRAIN, 16))
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(a[key], b[key])
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step - 4][key], halves[1][step - 4][key]]), a[key])
  # Step 6 is the first of epoch 1: its crops come from epoch 1's generators.
  first = in_process[2]
  expected = train.get_train_batch(first["index"], seed=1, epoch=1)["image"]
  np.testing.assert_array_equal(first["image"], expected)


def slow_square(key):
  time.sleep(0.05)
  return {"value": np.full((4,), key * key)}


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc")
def test_workers_survive_stop_signals_from_birth():
  """A Ctrl-C or preemption notice goes to the whole process group: the trainer handles it
  (checkpoint, then stop), so a worker must not die of it, not even while it is starting."""
  import threading  # pylint: disable=g-import-not-at-top
  from selfkd_jax.data.grain_reader import GrainReader  # pylint: disable=g-import-not-at-top
  signalled, done = set(), threading.Event()

  def signal_new_workers():  # SIGINT and SIGTERM to every grain worker, as soon as it exists
    while not done.is_set():
      for pid in _children(os.getpid()):
        try:
          with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"--multiprocessing-fork" not in f.read():
              continue  # multiprocessing's resource tracker
          for signum in (signal.SIGINT, signal.SIGTERM):
            os.kill(pid, signum)
          signalled.add(pid)
        except (FileNotFoundError, ProcessLookupError):
          pass
      time.sleep(0.01)

  thread = threading.Thread(target=signal_new_workers, daemon=True)
  thread.start()
  try:
    with GrainReader(slow_square, range(12), num_processes=1) as reader:
      values = [int(batch["value"][0]) for batch in reader]
  finally:
    done.set()
    thread.join()
  assert signalled, "no worker process was seen"
  assert values == [k * k for k in range(12)]


def square_or_fail(key):
  if key == 4:
    raise data.DataError(f"example {key} is corrupt")
  return {"value": np.full((256,), key * key)}


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="looks in /dev/shm")
def test_a_closed_reader_has_unlinked_every_shared_memory_block(monkeypatch):
  """grain unlinks the blocks a worker's results arrive in on a thread of its own, whose queue
  is dropped at exit: multiprocessing then prints a "leaked shared_memory" warning after the
  run's last line. close() waits for those unlinks; here each one is made slow, so a close
  that did not wait would return while blocks still exist."""
  from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
  from selfkd_jax.data.grain_reader import GrainReader  # pylint: disable=g-import-not-at-top
  unlinked = []
  close_now = shared_memory_array.SharedMemoryArray.close_shm_async.__func__

  def close_slowly(cls, shm, unlink):
    time.sleep(0.2)
    close_now(cls, shm, unlink)
    unlinked.append(shm.name)

  monkeypatch.setattr(shared_memory_array.SharedMemoryArray, "close_shm_async",
                      classmethod(close_slowly))
  values = []
  with pytest.raises(data.DataError, match="example 4 is corrupt"):
    with GrainReader(square_or_fail, range(8), num_processes=1) as reader:
      values.extend(int(batch["value"][0]) for batch in reader)
  assert values == [0, 1, 4, 9]
  assert len(unlinked) >= len(values)
  assert not [name for name in unlinked if os.path.exists(os.path.join("/dev/shm", name))]


def test_auto_workers(splits, monkeypatch):
  train, _, _ = splits
  for cores, expected in ((1, 0), (2, 0), (3, 2), (8, 7), (64, 16)):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)),
                        raising=False)
    assert data.num_processes_for(-1, train) == expected, cores
  assert data.num_processes_for(5, train) == 5
  assert data.num_processes_for(5, train, reader="threads") == 0
  in_memory = data.ArraySource(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2))
  assert data.num_processes_for(5, in_memory) == 0  # arrays: never read by workers


def test_grayscale_and_cmyk_jpegs_become_rgb(splits, data_dir):
  train, _, _ = splits
  raw = raw_images("selfkd_jpeg_tiny", data_dir)
  modes = [Image.open(io.BytesIO(b)).mode for b in raw]
  gray, cmyk = modes.index("L"), modes.index("CMYK")
  batch = train.get_batch(np.array([gray, cmyk]))
  assert batch["image"].shape == (2, SIZE, SIZE, 3)
  np.testing.assert_array_equal(batch["image"][0, ..., 0], batch["image"][0, ..., 2])
  assert np.ptp(batch["image"][1].astype(int), axis=(0, 1)).max() > 0


def test_corrupt_jpeg_names_split_and_example(data_dir):
  train, _, _ = data.load_splits("selfkd_jpeg_corrupt", data_dir=data_dir, image_size=SIZE)
  bad = raw_images("selfkd_jpeg_corrupt", data_dir).index(b"\xff\xd8 not a JPEG")
  for read in (lambda: train.get_batch(np.array([0, bad])),
               lambda: train.get_train_batch(np.array([bad]), seed=0, epoch=0)):
    with pytest.raises(data.DataError) as error:
      read()
    message = str(error.value)
    assert f"split 'train': example {bad} is not a decodable image" in message
    assert "selfkd_jpeg_corrupt" in message and "\n" not in message


# -- configuration -------------------------------------------------------------------------------

def test_unlabelled_test_split_evaluates_on_validation(data_dir):
  _, test, info = data.load_splits("selfkd_jpeg_unlabelled_test", data_dir=data_dir,
                                   image_size=SIZE)
  assert (info.num_train, info.num_test) == (16, 8)
  assert (test.get_batch(np.arange(8))["label"] >= 0).all()


def test_image_size_is_required_for_variable_size_and_refused_for_fixed(data_dir):
  with pytest.raises(data.ImageSizeError, match=r"config\.data\.image_size=0 but dataset "
                     r"'selfkd_jpeg_tiny' has variable-size images \(None, None, 3\)"):
    data.load_splits("selfkd_jpeg_tiny", data_dir=data_dir)
  with pytest.raises(data.ImageSizeError, match=r"config\.data\.image_size=32 applies to "
                     r"variable-size datasets only; 'digits' has fixed-size 8x8x1"):
    data.load_splits("digits", image_size=32)
  # The trainer reports it as a configuration error (exit 2), before anything is written.
  from selfkd_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = jpeg_config(data_dir, image_size=0)
  with pytest.raises(config_check.ConfigError, match="config.data.image_size=0"):
    loop.Experiment(config, "/nonexistent/never/written")


@pytest.mark.parametrize("key, value, message", [
    ("image_size", -1, "config.data.image_size=-1 must be an integer >= 0"),
    ("resize_size", 20, "config.data.resize_size=20 must be 0 (= image_size / 0.875) or an "
                        "integer >= config.data.image_size (32)"),
    ("workers", -2, "config.data.workers=-2 must be -1 (auto: cores - 1, at most 16), 0"),
    ("workers", 300, "config.data.workers=300 must be -1"),
])
def test_bad_values_are_refused_in_one_line(key, value, message):
  config = base_config()
  config.data.image_size = 32
  config.data[key] = value
  with pytest.raises(config_check.ConfigError) as error:
    config_check.check_config(config, 1)
  assert str(error.value).startswith(message) and "\n" not in str(error.value)
  config = base_config()
  config.data.resize_size, config.data.reader = 40, "threads"
  with pytest.raises(config_check.ConfigError, match="needs config.data.image_size > 0"):
    config_check.check_config(config, 1)
  config.data.resize_size, config.data.workers = 0, 2
  with pytest.raises(config_check.ConfigError, match="workers=2 needs config.data.reader"):
    config_check.check_config(config, 1)


def test_new_keys_leave_old_runs_comparable():
  current = json.loads(base_config().to_json())
  old = json.loads(base_config().to_json())
  for key in ("image_size", "resize_size", "workers"):
    del old["data"][key]
  assert config_check.comparable(old) == config_check.comparable(current)
  changed = json.loads(base_config().to_json())
  changed["data"]["image_size"] = 224
  assert config_check.comparable(changed) != config_check.comparable(old)


# -- launch.py end to end ------------------------------------------------------------------------

def jpeg_config(data_dir, **data_overrides):
  """The ImageNet recipe's smoke config (host crop, flip, colour jitter, lighting, ImageNet
  normalisation) on the test's JPEG dataset, with a small model, batch and schedule."""
  from selfkd_jax.train import imagenet_recipes  # pylint: disable=g-import-not-at-top
  from selfkd_jax.train.default_config import method_config  # pylint: disable=g-import-not-at-top
  config, _ = imagenet_recipes.pskd_imagenet("resnet50,smoke")
  config.data.name, config.data.dir, config.data.image_size = "selfkd_jpeg_tiny", data_dir, SIZE
  config.data.resize_size = 0
  config.data.limit_train = 0
  for key, value in data_overrides.items():
    config.data[key] = value
  config.model.name = "mlp"
  config.method = method_config("pskd")  # per-example tables keyed by the dataset index
  config.num_epochs, config.batch_size, config.eval_batch_size = 2, 16, 32
  config.eval_every_epochs = 2
  config.checkpoint_every_steps = 3
  config.log_every_steps = 3
  config.progress_bar = False
  config.optimizer.learning_rate = 0.01
  config.optimizer.schedule, config.optimizer.milestones = "constant", ()
  config.model.init = "flax"
  return config


CONFIG_FILE = '''
import sys
sys.path.insert(0, {tests!r})
import test_jpeg_pipeline  # registers the test datasets with TFDS


def get_config():
  return test_jpeg_pipeline.jpeg_config({data_dir!r})
'''


@pytest.fixture(scope="module")
def config_file(data_dir, tmp_path_factory):
  path = tmp_path_factory.mktemp("config") / "jpeg.py"
  path.write_text(CONFIG_FILE.format(tests=TESTS, data_dir=data_dir))
  return str(path)


def _command(workdir, config_file, *flags):
  return [sys.executable, "launch.py", f"--workdir={workdir}", f"--config={config_file}", *flags]


def _env():
  # XLA_FLAGS as this process has them (tests/conftest.py: 4 fake devices; under .ci/run's second
  # pass also its other XLA CPU configuration, which the cross-device comparison is about).
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")


def launch(workdir, config_file, *flags):
  return subprocess.run(_command(workdir, config_file, *flags), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=300)


def final_state(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
  manager.close()
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, state)


# Four devices reading through a grain worker process: the reference of the resume test.
FOUR_DEVICES = ("--config.num_devices=4", "--config.data.workers=1")


@pytest.fixture(scope="module")
def four_device_run(config_file, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("four") / "run")
  result = launch(workdir, config_file, *FOUR_DEVICES)
  assert result.returncode == 0, result.stderr
  return workdir


@pytest.mark.cross_device
def test_four_devices_with_a_worker_equal_one_device_in_process(four_device_run, data_dir,
                                                                tmp_path):
  import roundoff  # pylint: disable=g-import-not-at-top
  from selfkd_jax.train import loop  # pylint: disable=g-import-not-at-top
  # One device, the reads in this process (the same program as launch.py runs): the same
  # batches, so only the order of the float sums differs.
  config = jpeg_config(data_dir, workers=0)
  config.num_devices = 1
  results_1 = loop.train_and_evaluate(config, str(tmp_path / "one"))
  state_1, state_4 = final_state(str(tmp_path / "one")), final_state(four_device_run)
  assert int(state_1["step"]) == int(state_4["step"]) == 2 * (NUM_TRAIN // 16)
  assert state_4["method_state"]["past_predictions"]["rows"].shape == (NUM_TRAIN, NUM_CLASSES)
  roundoff.assert_trees_close_to_scale(state_4, state_1, roundoff.RUN_RTOL)
  with open(os.path.join(four_device_run, "results.json")) as f:
    results_4 = json.load(f)
  assert results_4["dataset"] == "selfkd_jpeg_tiny" and results_4["num_devices"] == 4
  assert abs(results_1["test_top1"] - results_4["test_top1"]) <= 1 / NUM_TEST


def _children(pid) -> set[int]:
  found = set()
  for task in os.listdir(f"/proc/{pid}/task"):
    try:
      with open(f"/proc/{pid}/task/{task}/children") as f:
        found.update(int(child) for child in f.read().split())
    except FileNotFoundError:  # a thread that ended meanwhile
      pass
  return found


def _running(pid) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc")
def test_sigkill_then_resume_equals_uninterrupted_run(four_device_run, config_file, tmp_path):
  workdir = str(tmp_path / "killed")
  process = subprocess.Popen(_command(workdir, config_file, *FOUR_DEVICES), cwd=REPO, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 240
  while not (os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))):
    assert process.poll() is None, process.stderr.read()
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.02)
  children = _children(process.pid)
  process.send_signal(signal.SIGKILL)
  process.wait()
  process.stderr.close()
  assert not os.path.exists(os.path.join(workdir, "results.json")), "the run was not interrupted"
  # The grain worker (and multiprocessing's helper) exit with the trainer instead of waiting on
  # their queues forever.
  assert children, "the run had no worker process"
  deadline = time.time() + 30
  while any(_running(pid) for pid in children) and time.time() < deadline:
    time.sleep(0.1)
  assert not any(_running(pid) for pid in children)

  resumed = launch(workdir, config_file, *FOUR_DEVICES)
  assert resumed.returncode == 0, resumed.stderr
  assert "Resuming from step" in resumed.stdout
  reference, again = final_state(four_device_run), final_state(workdir)
  import jax  # pylint: disable=g-import-not-at-top
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_corrupt_jpeg_exits_1_with_one_line(data_dir, tmp_path):
  path = tmp_path / "corrupt.py"
  path.write_text(CONFIG_FILE.format(tests=TESTS, data_dir=data_dir))
  bad = raw_images("selfkd_jpeg_corrupt", data_dir).index(b"\xff\xd8 not a JPEG")
  result = launch(str(tmp_path / "run"), str(path), "--config.num_devices=1",
                  "--config.data.workers=1", "--config.data.name=selfkd_jpeg_corrupt")
  assert result.returncode == 1, result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines[-1] == (
      f"error: dataset 'selfkd_jpeg_corrupt', split 'train': example {bad} is not a decodable "
      "image (not in an image format PIL recognises); re-encode or drop it and rebuild the "
      "dataset"), result.stderr
  assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
