"""Models: timm by name, or a small registry of tiny networks for tests and quickstarts."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from emulator.errors import UserError
from emulator.registry import Registry, did_you_mean

TINY_MODELS: Registry[nn.Module] = Registry("model")
register_tiny_model = TINY_MODELS.register


@register_tiny_model("tiny_cnn")
def tiny_cnn(*, num_classes: int, in_chans: int, width: int = 16) -> nn.Module:
    """Two conv blocks and a linear head: trains in seconds on a CPU.

    GroupNorm rather than BatchNorm: batch statistics of tiny non-IID client shards
    are noise, the usual choice in FL benchmarks.
    """
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1),
        nn.GroupNorm(4, width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.GroupNorm(4, 2 * width),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * width * 16, num_classes),
    )


@register_tiny_model("mlp")
def mlp(*, num_classes: int, in_chans: int, hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def check_model_name(name: str, *, key: str = "model.name") -> None:
    """A tiny model or a timm architecture; a one-line error with a suggestion otherwise."""
    if name in TINY_MODELS:
        return
    import timm

    if not timm.is_model(name):
        choices = TINY_MODELS.names() + timm.list_models()
        raise UserError(f"{key} = {name!r}: unknown model; {did_you_mean(name, choices)}")


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    image_size: int,
    pretrained: bool = False,
    checkpoint: str = "",
) -> nn.Module:
    """Build the model; parameters are drawn from torch's global RNG (seed it first)."""
    if name in TINY_MODELS:
        if pretrained:
            raise UserError(f"model.pretrained = true: tiny model {name!r} has no pre-trained weights")
        model = TINY_MODELS.get(name)(num_classes=num_classes, in_chans=in_chans)
    else:
        model = _timm_model(name, num_classes, in_chans, pretrained, checkpoint)
    # Materialise lazy layers so the flat parameter vector has a fixed size.
    with torch.no_grad():
        model.eval()(torch.zeros(1, in_chans, image_size, image_size))
    return model


def _timm_model(name: str, num_classes: int, in_chans: int, pretrained: bool, checkpoint: str) -> nn.Module:
    import timm

    check_model_name(name)
    kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans}
    if pretrained:
        if not checkpoint:
            raise UserError(
                f"model.pretrained = true for {name!r}: nothing is downloaded here; "
                "set model.checkpoint to a local weights file (.safetensors, .pth or .bin)"
            )
        path = Path(checkpoint)
        if not path.is_file():
            raise UserError(f"model.checkpoint = {checkpoint!r}: file not found")
        # timm's own loading path: it adapts the classifier and in_chans of the file.
        kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model {name!r}: cannot build it: {first}") from None
