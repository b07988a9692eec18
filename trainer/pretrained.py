"""Starting from weights (``--pretrained PATH_OR_URL``): a timm state dict, in safetensors or a torch
file, local or at any fsspec URL; an onion run's ``model.safetensors`` is one.

Reading is safe: safetensors holds only tensors, and a torch file is read with
``torch.load(weights_only=True)``, so a file that would need arbitrary unpickling (code) is refused,
never run. The weights are fitted to the model by timm's own ViT checkpoint filter (the position
embedding resampled to another patch grid, the patch embedding to another patch size); a classifier
head of another class count is left out, so the model's fresh head stays. What was changed is said
in one line each. Anything that is not this architecture's weights is one error naming the file.
"""
from __future__ import annotations

import io
import pickle
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from shards import location
from trainer.errors import RunError

SAFETENSORS = b"{"  # after its 8-byte header length, a safetensors file starts its JSON header
CONTAINERS = ("state_dict", "model", "module")  # where training scripts nest the weights in a checkpoint
HEAD_KEYS = ("head.weight", "head.bias")


def read_bytes(url: str, flag: str = "--pretrained") -> bytes:
    try:
        where = location(url)
        return where.fs.cat_file(where.root)
    except FileNotFoundError:
        raise RunError(f"{flag} {url}: no such file") from None
    except IsADirectoryError:
        raise RunError(f"{flag} {url}: a folder, not a weights file (an onion run's weights are "
                       "RUN/checkpoints/step-N/model.safetensors)") from None


def read_state_dict(url: str, flag: str = "--pretrained") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or torch weights file, by name (a checkpoint's nested dict unwrapped);
    errors name the file and the option that gave it (``flag``)."""
    data = read_bytes(url, flag)
    if len(data) > 8 and data[8:9] == SAFETENSORS:
        try:
            state = load_safetensors(data)
        except (SafetensorError, ValueError, OSError) as error:
            raise RunError(f"{flag} {url}: not a readable safetensors file ({error})") from None
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:  # a text file, or a pickle that would call code
            detail = [line for line in str(error).splitlines() if line.strip()][-2].strip()
            raise RunError(f"{flag} {url}: not safetensors, and torch.load(weights_only=True) refuses it "
                           f"({detail}): not a weights file, or one whose unpickling could run code") from None
        except (RuntimeError, EOFError, ValueError, OSError) as error:
            first = str(error).splitlines()[0] if str(error) else "truncated"
            raise RunError(f"{flag} {url}: neither safetensors nor a readable torch file "
                           f"({type(error).__name__}: {first})") from None
    for container in CONTAINERS:
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            state = state[container]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"{flag} {url}: holds no state dict of tensors (a {type(state).__name__})")
    return state


def fit_to(model: torch.nn.Module, state: dict[str, torch.Tensor],
           url: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` made to fit ``model`` by timm's ViT filter, and what that changed, in words."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    before = {name: tuple(tensor.shape) for name, tensor in state.items()}
    try:
        fitted = checkpoint_filter_fn(dict(state), model)
    except Exception as error:  # noqa: BLE001 - timm's filter fails in many ways on foreign weights
        raise RunError(f"--pretrained {url}: not weights of a timm VisionTransformer "
                       f"({type(error).__name__}: {error})") from None
    target = model.state_dict()
    said = []
    for name, tensor in fitted.items():
        if name in target and name in before and before[name] != tuple(tensor.shape):
            said.append(f"{name} resampled from {list(before[name])} to {list(tensor.shape)}")
    head = [name for name in HEAD_KEYS
            if name in fitted and name in target and fitted[name].shape != target[name].shape]
    if head:
        said.append(f"classifier head left out: {fitted['head.weight'].shape[0]} classes in the file, "
                    f"{target['head.weight'].shape[0]} here (a fresh head is trained)")
        for name in head:
            del fitted[name]
    return fitted, said


def load_pretrained(model: torch.nn.Module, url: str, say: Callable[[str], None]) -> None:
    """Load ``url``'s weights into the timm ViT ``model`` (before it is made sparse), saying what changed."""
    fitted, said = fit_to(model, read_state_dict(url), url)
    target = model.state_dict()
    wrong = [name for name, tensor in fitted.items() if name in target and tensor.shape != target[name].shape]
    missing = [name for name in target if name not in fitted and name not in HEAD_KEYS]
    unexpected = [name for name in fitted if name not in target]
    if wrong or missing or unexpected:
        problems = [f"{len(found)} {kind} (first: {found[0]})" for kind, found in
                    (("of another shape", wrong), ("missing", missing), ("not in the model", unexpected)) if found]
        raise RunError(f"--pretrained {url}: not weights of this model ({type(model).__name__}): "
                       f"{'; '.join(problems)}")
    model.load_state_dict(fitted, strict=False)
    say(f"--pretrained {url}: {len(fitted)} tensors loaded" + "".join(f"; {line}" for line in said))
