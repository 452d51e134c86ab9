"""The in-place KV cache layer against transformers' DynamicLayer (torch.cat at every update)."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from noisyrollout.models.kv_cache import RoomyLayer, make_room


def _kv(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 8, generator=g), torch.randn(batch, 2, length, 8, generator=g)


def test_updates_hold_what_concatenation_holds_through_growth_repeat_select_and_crop():
    plain, roomy = DynamicLayer(), RoomyLayer(room=3)
    ops = [("update", 5), ("update", 1), ("repeat", 3), ("update", 1), ("update", 4),   # 4 tokens: past the room
           ("crop", -2), ("update", 1), ("select", torch.tensor([5, 0, 2, 1, 4, 3])), ("update", 1), ("update", 1)]
    batch, seed = 2, 0
    for op, arg in ops:
        if op == "update":
            seed += 1
            k, v = _kv(batch, arg, seed)
            out_plain, out_roomy = plain.update(k, v), roomy.update(k, v)
            assert torch.equal(out_plain[0], out_roomy[0]) and torch.equal(out_plain[1], out_roomy[1])
        elif op == "repeat":
            plain.batch_repeat_interleave(arg)
            roomy.batch_repeat_interleave(arg)
            batch *= arg
        elif op == "select":
            plain.batch_select_indices(arg)
            roomy.batch_select_indices(arg)
            batch = len(arg)
        else:
            plain.crop(arg)
            roomy.crop(arg)
        assert roomy.get_seq_length() == plain.get_seq_length()
        assert torch.equal(roomy.keys, plain.keys) and torch.equal(roomy.values, plain.values)
    assert roomy.keys.data_ptr() == roomy._keys.data_ptr()           # the last updates wrote into the buffer


def test_a_decoding_step_writes_in_place_without_copying_the_cache():
    layer = RoomyLayer(room=4)
    layer.update(*_kv(2, 6, 0))
    buffer = layer._keys
    for step in range(4):
        layer.update(*_kv(2, 1, step + 1))
        assert layer._keys is buffer and layer.keys.shape[-2] == 7 + step
    layer.update(*_kv(2, 1, 9))                                         # the room is used up: one new buffer
    assert layer._keys is not buffer and layer._keys.shape[-2] == 11 + 4


def test_make_room_keeps_the_cached_tensors_and_refuses_gradient():
    cache = DynamicCache()
    k, v = _kv(3, 4, 0)
    cache.update(k, v, layer_idx=0)
    cache.update(k * 2, v * 2, layer_idx=1)
    make_room(cache, room=2)
    assert all(isinstance(layer, RoomyLayer) for layer in cache.layers)
    assert torch.equal(cache.layers[1].keys, k * 2) and cache.get_seq_length() == 4
    k2, v2 = _kv(3, 1, 1)
    keys, _ = cache.update(k2, v2, layer_idx=0)
    assert torch.equal(keys, torch.cat([k, k2], dim=-2))
    with pytest.raises(RuntimeError, match="decoding"):
        cache.update(k2.requires_grad_(), v2, layer_idx=1)
