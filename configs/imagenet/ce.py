"""Cross-entropy baseline, ResNet-152 (or ResNet-50) on ImageNet, PS-KD's ImageNet pipeline.

`selfkd_jax/train/imagenet_recipes.py` has the recipe and its sources: torchvision-layout ResNet
with Kaiming-normal fan-out convs; RandomResizedCrop(224) on the host (grain workers), flip,
ColorJitter(0.4) and Lighting(0.1) on the device, ImageNet normalisation; eval Resize(256) +
CenterCrop(224). The solver is not in PS-KD's code or README: this is the standard ImageNet
ResNet solver (90 epochs, global batch 256, lr 0.1 x0.1 at 30 and 60, wd 1e-4), our choice.

The config argument picks the network: `:resnet152` (default) or `:resnet50`; add `,smoke`
for 2 epochs on 2048 examples at 64 x 64. ImageNet must be prepared with TFDS first (manual
download of the ILSVRC2012 tar files into the TFDS manual dir, as TFDS documents):

    tfds build imagenet2012 --file_format=array_record --data_dir=/nfs/tensorflow_datasets \
        --manual_dir=/nfs/imagenet_tars

One GPU node (all its GPUs, one process):

    python launch.py --config=configs/imagenet/ce.py:resnet152 --workdir=/nfs/runs/in_ce \
        --config.data.dir=/nfs/tensorflow_datasets

Several GPU nodes under SLURM (one task per node; the same global batch, split over every GPU):

    srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 \
        python launch.py --config=configs/imagenet/ce.py:resnet152 \
        --workdir=/nfs/runs/in_ce --config.data.dir=/nfs/tensorflow_datasets

A TPU pod slice (the same command on every host):

    gcloud compute tpus tpu-vm ssh my-slice --worker=all --command "cd selfkd_jax && \
        python launch.py --distributed --config=configs/imagenet/ce.py:resnet152 \
        --workdir=gs://my-bucket/runs/in_ce --config.data.dir=gs://my-bucket/tfds"

Expected (PS-KD README "Results on ImageNet", ResNet-152, top-1 / top-5 error, best epoch):
baseline 22.19 / 6.19, label smoothing 21.73 / 5.85, PS-KD 21.41 / 5.86. ResNet-50 has no
published PS-KD number; `config.published` is set for ResNet-152 only.
"""
from selfkd_jax.train import imagenet_recipes
from selfkd_jax.train.default_config import method_config, published_result


def get_config(arg=None):
  config, model = imagenet_recipes.pskd_imagenet(arg)
  config.method = method_config("ce")
  if model == "resnet152":
    error = imagenet_recipes.PUBLISHED_ERROR["ce"]
    config.published = published_result(round(100 - error, 2), "best",
                                        f"PS-KD README, ResNet-152 (top-1 error {error})")
  return config
