"""Attention for the decode steps of a micro-batch in one call, over each request's own KV cache.

A decode step brings one new token per request; the requests' caches hold different lengths.
``DecodeBatch`` stacks those steps into one ``[B, 1, H]`` batch: position ids and rotary
embeddings per row, a padding mask built by transformers' own mask function for the model's
attention implementation, and ``PaddedCacheView``, a cache the attention module writes through:
each row's new key/value goes into its request's ``DynamicCache`` (so the caches stay exactly as
one request alone would leave them), and the module reads the rows' caches right-padded to the
longest. Padded positions are masked out, so a row's output differs from the request computed
alone only by floating-point order (a batched matmul may sum in another order).

Only for layers that attend to every earlier token (``full_attention``) and for the ``sdpa`` and
``eager`` implementations, where the adapter allows it
(``ArchitectureAdapter.batches_decode_attention``); prefill steps (several tokens) and other layouts run per request.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: attention implementations whose mask is a dense [B, 1, q, kv] tensor that padding can go into
BATCHABLE_IMPLEMENTATIONS = ("sdpa", "eager")


def can_batch_decode(adapter, hf_config, attention_types: list[str]) -> bool:
    """Whether this shard's decode steps may share one attention call."""
    impl = getattr(hf_config, "_attn_implementation", None)
    return (
        impl in BATCHABLE_IMPLEMENTATIONS
        and all(kind == "full_attention" for kind in attention_types)
        and adapter.batches_decode_attention(hf_config)
    )


class PaddedCacheView:
    """What the attention module calls ``cache.update`` on, for a batch of decode rows."""

    def __init__(self, caches: list):
        self.caches = caches

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key/value [B, kvh, 1, d] -> every row's whole cache, right-padded: [B, kvh, K, d] each."""
        keys, values = [], []
        for row, cache in enumerate(self.caches):
            k, v = cache.update(key_states[row : row + 1], value_states[row : row + 1], layer_idx, *args, **kwargs)
            keys.append(k)
            values.append(v)
        longest = max(k.shape[-2] for k in keys)
        return _stack_padded(keys, longest), _stack_padded(values, longest)


def _stack_padded(parts: list[torch.Tensor], length: int) -> torch.Tensor:
    return torch.cat([F.pad(p, (0, 0, 0, length - p.shape[-2])) for p in parts])  # [B, kvh, length, d]


class DecodeBatch:
    """The inputs of one batched attention call for decode rows at positions ``starts``."""

    def __init__(self, rows: list[int], starts: list[int], caches: list, hf_config, rotary, like: torch.Tensor):
        """``like``: one row's hidden states, for the dtype and device (the rotary embedding and
        the mask take the batch size from the position ids)."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        self.rows = rows  # indices of these requests in the micro-batch
        device = like.device
        self.position_ids = torch.tensor(starts, device=device)[:, None]  # [B, 1]
        self.rotary = rotary(like, self.position_ids)  # cos, sin [B, 1, d]
        kv_lengths = torch.tensor(starts, device=device) + 1  # each row's cache after this token
        longest = int(kv_lengths.max())
        padding = torch.arange(longest, device=device)[None] < kv_lengths[:, None]  # [B, K] True: a real key
        self.mask = ALL_MASK_ATTENTION_FUNCTIONS[hf_config._attn_implementation](
            batch_size=len(rows), q_length=1, kv_length=longest, q_offset=longest - 1, attention_mask=padding,
            allow_is_causal_skip=False, dtype=like.dtype, device=device,
        )  # [B, 1, 1, K]  # fmt: skip
        self.cache = PaddedCacheView(caches)

    def attend(self, adapter, layer, hidden: list[torch.Tensor]) -> None:
        """Replace ``hidden[i]`` ([1, 1, H]) of every row by its attention half, in one call."""
        stacked = torch.cat([hidden[i] for i in self.rows])  # [B, 1, H]
        out = adapter.attention_half(
            layer, stacked, attention_mask=self.mask, position_ids=self.position_ids, cache=self.cache,
            use_cache=True, position_embeddings=self.rotary,
        )  # [B, 1, H]  # fmt: skip
        for j, i in enumerate(self.rows):
            hidden[i] = out[j : j + 1]
