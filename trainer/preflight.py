"""What is checked before a run claims its folder or starts any long work: the device exists and
the model is one onion can train on this dataset. Each failure is one line naming the setting
(:class:`RunError`, exit 2), raised in the launching process, before ``--nproc`` ranks are spawned."""
from __future__ import annotations

import torch

from shards import location, read_manifest
from shards.manifest import require_labels
from trainer.config import TrainConfig
from trainer.errors import RunError
from trainer.inputs import data_info, input_side
from trainer.model import check_model


def check_device(name: str) -> None:
    """Refuse a ``--device`` this machine does not have (torch would fail deep inside the first
    ``.to(device)`` with a driver message)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise RunError(f"--device {name}: not a device torch knows (auto, cpu, cuda, cuda:1, mps, ...)") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {name}: no CUDA device is available here (torch finds no NVIDIA GPU and driver); "
                           "use --device cpu, or --device auto to take a GPU when there is one")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RunError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"--device {name}: no Apple MPS device is available here; use --device cpu or auto")


def check_start(config: TrainConfig) -> None:
    """The dataset's labels, the device, then the model on this dataset's image size and classes (read
    from its index). ``onion train`` and ``onion curate`` both start here."""
    require_labels(read_manifest(location(config.dataset)), config.dataset, "training a classifier")
    check_device(config.device)
    info = data_info(location(config.dataset))
    check_model(config, input_side(config, info), info.num_classes)
