"""Load one shard of a model: the skeleton on ``meta``, then only the shard's own tensors.

A pipeline stage needs the decoder layers of its range (attention, norms, routers, shared
experts), the token embedding if it is first (or the head is tied to it), and the final norm and
head if it is last; its routed experts live in the host store, read one by one from the same
files (``actors/host_store.py``). Nothing else is read: the model is built on the ``meta`` device
(no memory), the layers of other stages become ``nn.Identity``, the fused expert tensors empty
placeholders, and every remaining parameter is read from the safetensors files by name, through
the family's own checkpoint renamings (transformers' conversion mapping, e.g. Mixtral's
``block_sparse_moe`` -> ``mlp``), and assigned in place. Non-persistent buffers (the rotary
embedding's frequencies) are rebuilt from the config.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from expertmap.actors.checkpoint import CheckpointReader
from expertmap.actors.model_folder import DTYPES, ModelFolderError
from expertmap.actors.offloaded_experts import EXPERTS_IMPLEMENTATION

logger = logging.getLogger(__name__)


class ShardLoadError(ModelFolderError):
    """The checkpoint lacks a tensor the shard needs (or has one of the wrong shape)."""


def build_skeleton(folder: Path, hf_config, dtype: str) -> nn.Module:
    """The model's module tree on ``meta`` (no weights), its generation config from the folder."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch_dtype = DTYPES[dtype] if dtype != "auto" else (getattr(hf_config, "dtype", None) or torch.float32)
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            hf_config, dtype=torch_dtype, experts_implementation=EXPERTS_IMPLEMENTATION, trust_remote_code=False
        )
    if (Path(folder) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval().requires_grad_(False)


def load_shard_tensors(model: nn.Module, reader: CheckpointReader, hf_config) -> int:
    """Read every parameter and persistent buffer ``model`` still holds on ``meta`` (the shard's
    own, once the rest was dropped) from the checkpoint and assign it; rebuild the rotary
    frequencies. Returns the bytes read."""
    from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

    wanted = {name: t for name, t in model.state_dict(keep_vars=True).items() if t.is_meta and t.numel() > 0}
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    state: dict[str, torch.Tensor] = {}
    read = 0
    for key in reader.keys():
        name = key
        for renaming in renamings:
            name, _ = renaming.rename_source_key(name)
        target = wanted.get(name)
        if target is None or name in state:
            continue
        tensor = reader.get(key)
        if tuple(tensor.shape) != tuple(target.shape):
            raise ShardLoadError(f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the model's {name} "
                                 f"expects {tuple(target.shape)}")  # fmt: skip
        read += tensor.numel() * tensor.element_size()
        state[name] = tensor.to(target.dtype)
    tied = _tied_head(model)
    missing = sorted(set(wanted) - set(state) - ({tied} if tied else set()))
    if missing:
        raise ShardLoadError(f"the checkpoint has no tensor for {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''} (looked for them through the family's renamings)")  # fmt: skip
    model.load_state_dict(state, strict=False, assign=True)
    if tied and tied in wanted:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _rebuild_rotary(model, hf_config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and t.numel() > 0]
    if left:
        raise ShardLoadError(f"after loading, {', '.join(left[:5])} have no values (a module this loader does not know)")
    return read


def _tied_head(model: nn.Module) -> str | None:
    """``lm_head.weight`` when the head shares the token embedding's weights (not stored twice)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, nn.Linear) or not isinstance(embed, nn.Embedding):
        return None
    return "lm_head.weight"


def _rebuild_rotary(model: nn.Module, hf_config) -> None:
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None and any(b.is_meta for b in rotary.buffers()):
        model.model.rotary_emb = type(rotary)(config=hf_config)
