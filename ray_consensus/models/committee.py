"""Committee members: a timm name plus a source of weights; everything else comes from timm.

A member's preprocessing is read from timm's data config (input size, interpolation,
mean, std). The crop is not: every member sees the same square crop of each image (the
run's shared image grid), so that all maps of one image cover the same pixels and can be
voted element-wise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ray_consensus.errors import SpecError, first_line
from ray_consensus.models.names import check_arch
from ray_consensus.models.pretrained import check_head, timm_kwargs
from ray_consensus.runroot.units import fingerprint
from ray_consensus.spec.config import MemberSpec, StorageSpec
from ray_consensus.storage.datafiles import read_uri_bytes


def load_state_dict_bytes(data: bytes, source: str) -> dict[str, Tensor]:
    """A state dict from checkpoint bytes, never executing pickled code.

    `.safetensors` is read as such; anything else goes through `torch.load(weights_only=True)`,
    which refuses pickles that build arbitrary objects.
    """
    if source.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except (SafetensorError, KeyError, RuntimeError) as e:  # a bad header; a dtype or shape torch refuses
            raise SpecError(f"checkpoint {source}: not a valid safetensors file ({e})") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the bytes provoke (UnpicklingError for code, RuntimeError, EOFError...): one line
        raise SpecError(f"checkpoint {source}: refused to load (only plain tensor state dicts are accepted; "
                        f"pickled code is never executed): {first_line(e)}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise SpecError(f"checkpoint {source}: expected a state dict of tensors")
    return obj


def create_member_model(member: MemberSpec, num_classes: int, storage: StorageSpec | None = None) -> nn.Module:
    """Build the member's timm model with its weights, in eval mode, on the CPU.

    Checkpoints are read from local paths or s3:// (with `storage`'s settings).
    Raises SpecError when the name is unknown, the weights cannot be had or do not fit.
    """
    import timm

    check_arch(member.arch)
    kwargs = timm_kwargs(member.kwargs)
    if member.weights == "pretrained":
        try:
            model = timm.create_model(member.arch, pretrained=True, **kwargs)
        except Exception as e:  # the hub's, the network's or the checkpoint's errors, of several libraries: one line
            raise SpecError(f"model {member.id}: cannot load pretrained weights for '{member.arch}': "
                            f"{first_line(e)}") from None
        check_head(member, model.num_classes, num_classes)
    else:
        # Seeded from the member, so `random` weights are the same in every actor and every run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(fingerprint("init", member.id, member.arch), 16) % 2**31)
            model = timm.create_model(member.arch, pretrained=False, num_classes=num_classes, **kwargs)
        if member.weights != "random":
            try:
                data = read_uri_bytes(member.weights, storage)
            except FileNotFoundError:
                raise SpecError(f"model {member.id}: checkpoint not found: {member.weights}") from None
            state = load_state_dict_bytes(data, member.weights)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                detail = " ".join(str(e).split())[:300]
                raise SpecError(f"model {member.id}: checkpoint {member.weights} does not fit '{member.arch}' "
                                f"with {num_classes} classes: {detail}") from None
    return model.eval()


@dataclass(frozen=True)
class DataConfig:
    """The member's preprocessing as timm describes it."""

    input_size: tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def member_data_config(model: nn.Module) -> DataConfig:
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    interp = cfg.get("interpolation", "bilinear")
    return DataConfig(input_size=tuple(cfg["input_size"][1:]),
                      interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
                      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


class Preprocess(nn.Module):
    """Shared crop -> member input: (B, 3, S, S) in [0, 1] -> (B, 3, h, w), normalised. Differentiable."""

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.size, self.mode = cfg.input_size, cfg.interpolation
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return (self.resize(images) - self.mean) / self.std

    def linear(self, images: Tensor) -> Tensor:
        """The linear part of forward(), resize(images) / std: forward(a + b) = forward(a) + linear(b)."""
        return self.resize(images) / self.std

    def resize(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) == tuple(self.size):
            return images
        antialias = self.mode in ("bilinear", "bicubic")
        return F.interpolate(images, size=self.size, mode=self.mode, antialias=antialias,
                             **({} if self.mode == "nearest" else {"align_corners": False}))


def resample_maps(maps: Tensor, size: int) -> Tensor:
    """(B, h, w) -> (B, size, size), area-preserving bilinear (antialiased when shrinking)."""
    if tuple(maps.shape[-2:]) == (size, size):
        return maps
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[:, 0]
