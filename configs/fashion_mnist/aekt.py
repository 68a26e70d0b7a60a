"""AEKT (reconstruction; DKD terms with beta 1, adaptive TCKD weight clipped at 1, serialization
head) from the CE-trained LeNet-5-BN teacher, on Fashion-MNIST.

beta 1 and a 5-epoch warm-up as in configs/fashion_mnist/dkd.py (beta 8 diverged there); with
the weight clipped at 4 the head and the amplified TCKD collapsed training to chance in a
6-epoch trial (see `methods.aekt`). The serialization head (10x10, identity init,
`heads.SerializationHead`) is attached to the model and trained by the run's optimizer. The
teacher is shared with kd.py.

    python launch.py --config=configs/fashion_mnist/aekt.py --workdir=runs/fmnist_aekt
    python launch.py --config=configs/fashion_mnist/aekt.py:smoke --workdir=/tmp/smoke
    # teacher-free: the ReffAKD soft labels as pseudo-teacher
    python launch.py --config=configs/fashion_mnist/aekt.py --workdir=runs/fmnist_aekt_reffakd \
        --config.method.teacher=reffakd --config.method.autoencoder_epochs=10

Expected: benchmarks/results/fashion_mnist has the measured table.
"""
from selfkd_jax.train.default_config import fashion_mnist_recipe, method_config, teacher_config

TEACHER_WORKDIR = "teachers/fashion_mnist_ce"


def get_config(arg=None):
  config = fashion_mnist_recipe(arg)
  config.method = method_config("aekt", alpha=1.0, beta=1.0, temperature=4.0,
                                warmup_epochs=5.0, teacher="checkpoint")
  config.teacher = teacher_config("configs/fashion_mnist/ce.py", arg,
                                  workdir="" if arg else TEACHER_WORKDIR)
  return config
