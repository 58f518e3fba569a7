"""timm architectures: `model.name: timm/<name>` (convnext_tiny, vit_small_patch16_224,
deit_small_patch16_224, swin_tiny_patch4_window7_224, xcit_small_12_p16_224, ...).

The net comes from `timm.create_model(name, pretrained=False, num_classes=..., **kwargs)`;
`dist_free.engine.models.build_model` puts the project's `Normalize` in front of it, as for every other
architecture, so eps stays in pixel units. Nothing is ever downloaded: weights start fresh, or
from a local safetensors file (`model.init`) whose every key and shape is checked before the
first step. `kwargs` are the architecture arguments timm takes (img_size, patch_size,
drop_path_rate, depth, ...): data from the config, checked by building the net on the meta
device before any process group exists. An argument with which timm would read weights or a
config from a file, a cache or the hub is refused (`weight_source_key`), whether it comes from a
config, a checkpoint's config or an export's model card.

timm is imported lazily: the torchvision and small-net paths never pay for its import.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

PREFIX = "timm/"

# Arguments of timm.create_model and timm.models.build_model_with_cfg (timm 1.0) with which timm
# reads weights or a pretrained config from a file, its cache or the hub: `pruned` reads a
# channel file, the rest load checkpoints. The rule below catches what a later timm may add.
WEIGHT_SOURCE_ARGS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
    "pretrained_filter_fn", "pretrained_model_args", "checkpoint_path", "cache_dir", "pruned"})
# ...and any argument with one of these among its "_"-separated words,
WEIGHT_SOURCE_WORDS = frozenset({"pretrained", "checkpoint", "ckpt", "cache", "hub", "url", "file",
                                 "filename", "download", "weights"})
# ...except architecture arguments that read nothing: SwinV2's window size of the weights it
# would be fine-tuned from, TinyViT's gradient checkpointing.
READ_FREE_ARGS = frozenset({"pretrained_window_size", "pretrained_window_sizes",
                            "pretrained_win_size", "use_checkpoint"})


class InitError(ValueError):
    """A `model.init` file that is missing, unreadable or does not fit the model."""


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def arch(name: str) -> str:
    """timm's own name: "timm/convnext_tiny" -> "convnext_tiny"."""
    return name[len(PREFIX):]


def weight_source_key(kwargs: dict | None) -> str | None:
    """The first key of `kwargs` with which timm would read weights or a config from a file, a
    cache or the network (WEIGHT_SOURCE_ARGS, or a name with a WEIGHT_SOURCE_WORDS word), else
    None."""
    for key in kwargs or {}:
        name = str(key).lower()
        if name in READ_FREE_ARGS:
            continue
        if name in WEIGHT_SOURCE_ARGS or WEIGHT_SOURCE_WORDS & set(name.split("_")):
            return str(key)
    return None


def create_net(name: str, num_classes: int, kwargs: dict | None = None) -> nn.Module:
    """The bare timm net, freshly initialised. ValueError names an unknown architecture, an
    argument it does not take, or one with which timm would read weights (checked before timm
    sees any argument: nothing is read or downloaded)."""
    key = weight_source_key(kwargs)
    if key is not None:
        raise ValueError(f"argument {key!r} would have timm read weights or a config from a file, "
                         "a cache or the hub; timm nets start fresh here (to start from weights, "
                         "model.init names a local .safetensors file, every key and shape checked)")
    import timm
    short = arch(name)
    if not timm.is_model(short):
        raise ValueError(f"unknown timm architecture {short!r} (timm {timm.__version__}; "
                         "timm.list_models() lists them)")
    try:
        # pretrained=False: timm never looks for weights, so nothing touches the network.
        return timm.create_model(short, pretrained=False, num_classes=num_classes,
                                 **(kwargs or {}))
    except TypeError as e:   # an argument the architecture's constructor does not take
        raise ValueError(f"timm/{short} does not take these arguments {kwargs}: {e}") from None
    except (AssertionError, RuntimeError) as e:   # e.g. img_size not divisible by patch_size
        raise ValueError(f"timm/{short} cannot be built with {kwargs}: "
                         f"{type(e).__name__}: {e}") from None


def check_buildable(name: str, num_classes: int, kwargs: dict | None) -> None:
    """Build the net on the meta device (no memory, no compute): fails fast on a bad name or
    argument. ValueError, as create_net."""
    with torch.device("meta"):
        create_net(name, num_classes, kwargs)


def no_weight_decay_names(net: nn.Module) -> set[str]:
    """Parameter names the architecture marks as tokens/embeddings (timm's `no_weight_decay`:
    pos_embed, cls_token, ...), relative to `net`."""
    marked = getattr(net, "no_weight_decay", None)
    return set(marked()) if callable(marked) else set()


# ------------------------------------------------------------------ model.init

def read_init(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InitError(f"model.init: {path} does not exist (a local .safetensors file; nothing "
                        "is downloaded)")
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own and OSError types for foreign files
        raise InitError(f"model.init: cannot read {path} as safetensors: "
                        f"{type(e).__name__}: {e}") from None


def net_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a bare net's state_dict, a dist-free export ("1." keys) or a NormalizedModel's
    ("net." keys, normalize.* dropped): the keys of the net itself."""
    for prefix in ("1.", "net."):
        if state and all(k.startswith(prefix) or k.startswith("normalize.") for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def fit_report(net: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Every way `state` fails to fit `net`: missing and unexpected keys, shape mismatches."""
    own = net.state_dict()
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in own.items() if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in own.items() if k in state and state[k].shape != v.shape]
    return problems


def load_init(net: nn.Module, path) -> int:
    """Copy `path`'s weights into the bare net after checking every key and shape; returns the
    number of tensors loaded. InitError says what does not fit."""
    state = net_keys(read_init(path))
    problems = fit_report(net, state)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5
                                           else "")
        raise InitError(f"model.init: {path} does not fit this model ({len(problems)} "
                        f"problem(s)): {shown}")
    net.load_state_dict(state)
    return len(state)
