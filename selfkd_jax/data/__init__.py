"""Input pipelines with stable example indices, local datasets and on-device augmentation.

    train, test, info = load_splits('fashion_mnist')
    batches = TrainBatches(train, seed=0, global_batch_size=128, start_step=0, num_steps=1000,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
    for batch in prefetch_to_device(batches, NamedSharding(mesh, P('data'))):
      images = augment_batch(batch['image'], batch['index'], key=key, epoch=epoch,
                             crop_padding=info.crop_padding, flip=info.flip,
                             mean=info.mean, std=info.std)

Variable-size TFDS image datasets (imagenet2012, imagenette) need `load_splits(name,
image_size=224)`: their images are decoded and cropped on the host (`image_transforms`), in
grain worker processes with `TrainBatches(..., num_processes=k)`.
"""
from selfkd_jax.data.array_source import ArraySource
from selfkd_jax.data.augment import augment_batch, normalize
from selfkd_jax.data.errors import DataError
from selfkd_jax.data.info import DATASET_NAMES, DatasetInfo
from selfkd_jax.data.pairs import cached_source_labels, same_class_partners
from selfkd_jax.data.pipeline import (TrainBatches, epoch_permutation, eval_batches,
                                      num_processes_for, prefetch_to_device, steps_per_epoch,
                                      train_batch_indices)
from selfkd_jax.data.sources import load_splits
from selfkd_jax.data.tfds_source import EncodedImageSource, ImageSizeError

__all__ = [
    "ArraySource", "DATASET_NAMES", "DataError", "DatasetInfo", "EncodedImageSource",
    "ImageSizeError", "TrainBatches", "augment_batch", "cached_source_labels",
    "epoch_permutation", "eval_batches", "load_splits", "normalize", "num_processes_for",
    "prefetch_to_device", "same_class_partners", "steps_per_epoch", "train_batch_indices",
]
