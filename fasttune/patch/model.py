"""Apply fasttune's fast path to one model instance, per family, and undo it.

``patch_model(model)`` replaces the ``forward`` of specific submodules *of that instance* (never a class, never
library source): every RMSNorm, every decoder MLP (fused LoRA MLP; a mixture of experts: grouped experts with split
LoRA, :mod:`fasttune.patch.moe`), the attention projections (fused Q/K/V and O) and
the causal-LM head (fused linear cross-entropy when labels are given); and an SDPA model's attention becomes
per-segment SDPA for packed rows (:mod:`fasttune.patch.attention`, the one change made through the config). It works on a plain transformers model or a
peft-wrapped one; call it again after ``get_peft_model`` and it installs the fused LoRA blocks over the new layers.
``unpatch_model(model)`` restores every replaced forward, so the model computes exactly what it did before.

transformers (>= 5.25, which installs the ``kernels`` library) "kernelizes" a loaded model by default and does it again
on every ``train()`` / ``eval()`` switch: each layer class decorated with ``use_kernel_forward_from_hub`` (every
RMSNorm, some activations) gets the Hub kernel for the device or, where there is none (CPU), its class forward back,
by dropping the instance's ``forward``. That silently removed fasttune's fused norms at the first ``model.train()``.
``patch_model`` therefore turns that kernelization off on the models it patches (recorded, and turned back on by
``unpatch_model``): fasttune's own forwards are the fast path there.

Which model types have a fast path is the registry's (:mod:`fasttune.models`, ``FamilySpec.fast_path``);
:data:`FAST_PATHS` maps each to the function that turns the family's :class:`fasttune.models.FamilySpec` into patches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedModel

from fasttune.lora.unwrap import base_model
from fasttune.models import FamilySpec, families, get_family

from . import attention
from .forwards import (
    HF_ACTIVATIONS,
    make_attention_forward,
    make_mlp_forward,
    make_norm_forward,
    make_projection_forward,
)
from .loss import make_causal_lm_forward
from .moe import make_moe_forward
from .vision_tower import patch_vision_tower

_RECORD = "_fasttune_fast_patches"


@dataclass
class PatchRecord:
    """The forwards fasttune replaced on one model: ``(module, previous instance forward or None)``."""

    entries: list[tuple[nn.Module, Callable | None, Callable]] = field(default_factory=list)
    attn_implementation: tuple[object, str] | None = None  # (config, the implementation it had before)
    hub_kernels: list[nn.Module] = field(default_factory=list)  # models whose transformers kernelization was on

    def suspend_hub_kernels(self, hf_model: nn.Module) -> None:
        """Turn off transformers' Hub-kernel switching (see the module docstring) on every model inside ``hf_model``."""
        for module in hf_model.modules():
            if isinstance(module, PreTrainedModel) and getattr(module, "use_kernels", False):  # transformers >= 5.x
                module.use_kernels = False  # reset_kernels(): every decorated layer back to its class forward
                self.hub_kernels.append(module)

    def install(self, module: nn.Module, new_forward: Callable) -> None:
        previous = module.__dict__.get("forward")
        module.forward = new_forward
        self.entries.append((module, previous, new_forward))


def _activation(config, spec: FamilySpec) -> str:
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if name is None:
        return spec.activation
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"hidden_act: {name!r} has no fused MLP in fasttune; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def _decoder_layers(hf_model: nn.Module) -> list[nn.Module]:
    return [m for m in hf_model.modules() if hasattr(m, "mlp") and hasattr(m, "self_attn")]


def _patch_family(hf_model: nn.Module, spec: FamilySpec, record: PatchRecord) -> None:
    config = hf_model.config.get_text_config()
    activation = _activation(config, spec)
    for module in hf_model.modules():
        if type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter):
            record.install(module, make_norm_forward(module, offset=spec.norm == "rms_offset"))
    qkv = tuple(n for n in spec.attention if n != "o_proj")
    for layer in _decoder_layers(hf_model):
        mlp, attn = layer.mlp, layer.self_attn
        dense = all(hasattr(mlp, n) for n in spec.mlp)
        sparse = spec.moe is not None and spec.moe.is_block(mlp)
        if not ((dense or sparse) and all(hasattr(attn, n) for n in spec.attention)):
            continue  # not a decoder layer of this family (e.g. a vision tower's encoder layer)
        if dense:
            record.install(mlp, make_mlp_forward(mlp, spec.mlp, activation, mlp.forward))
        else:  # a mixture of experts: grouped experts with split LoRA (patch/moe.py)
            record.install(mlp, make_moe_forward(mlp, spec.moe, mlp.forward))
        for name in spec.attention:
            proj = getattr(attn, name)
            record.install(proj, make_projection_forward(proj, proj.forward))
        if len(qkv) > 1:
            record.install(attn, make_attention_forward(attn, qkv, attn.forward))
    if hasattr(hf_model, "get_output_embeddings") and hf_model.get_output_embeddings() is not None:
        record.install(hf_model, make_causal_lm_forward(hf_model, hf_model.forward))
    if spec.packed_masks:  # the backbone ignores position ids for its masks: packed rows get ours (patch/attention.py)
        backbone = getattr(hf_model, hf_model.base_model_prefix, hf_model)
        record.install(backbone, attention.make_packed_mask_forward(backbone, backbone.forward))
    if config._attn_implementation == "sdpa":  # packed rows: SDPA per segment (exact; see patch/attention.py)
        attention.acquire(config)
        record.attn_implementation = (config, config._attn_implementation)
        config._attn_implementation = attention.NAME


# model_type -> function applying the fast path to a model of that family: every registered family whose spec says
# ``fast_path``. One generic patcher serves them all: it reads the spec's norm kind, activation and projection names.
FAST_PATHS: dict[str, Callable[[nn.Module, FamilySpec, PatchRecord], None]] = {
    spec.model_type: _patch_family for spec in families() if spec.fast_path
}


def is_patched(model: nn.Module) -> bool:
    return _RECORD in base_model(model).__dict__


def patch_model(model: nn.Module) -> None:
    """Install fasttune's fast forwards on ``model`` (transformers or peft-wrapped); re-patches if already patched."""
    hf_model = base_model(model)
    model_type = hf_model.config.get_text_config().model_type
    if model_type not in FAST_PATHS:
        raise ValueError(
            f"model_type: {model_type!r} has no fasttune fast path; supported: {sorted(FAST_PATHS)}"
        )
    spec = get_family(model_type)
    if spec is None:
        raise ValueError(f"model_type: {model_type!r} is not in fasttune.models' registry")
    if is_patched(hf_model):
        unpatch_model(hf_model)
    record = PatchRecord()
    try:
        record.suspend_hub_kernels(hf_model)
        FAST_PATHS[model_type](hf_model, spec, record)
        patch_vision_tower(hf_model, record)  # a VLM's tower and projector (a text model has none)
    except Exception:
        _restore(record)
        raise
    hf_model.__dict__[_RECORD] = record


def _restore(record: PatchRecord) -> None:
    if record.attn_implementation is not None:
        config, previous = record.attn_implementation
        config._attn_implementation = previous
        record.attn_implementation = None
        attention.release(config)
    for module, previous, ours in reversed(record.entries):
        current = module.__dict__.get("forward")
        if current is not ours:
            raise RuntimeError(
                f"unpatch_model: the forward of {type(module).__name__} was replaced after fasttune patched it "
                "(by another library?); unwrap that first"
            )
        if previous is None:
            del module.forward
        else:
            module.forward = previous
    record.entries.clear()
    for module in reversed(record.hub_kernels):
        module.use_kernels = True  # kernelizes again, for the mode the model is in
    record.hub_kernels.clear()


def unpatch_model(model: nn.Module) -> None:
    """Undo :func:`patch_model`: every replaced forward is restored. A no-op on a model that is not patched."""
    hf_model = base_model(model)
    record = hf_model.__dict__.pop(_RECORD, None)
    if record is not None:
        _restore(record)
