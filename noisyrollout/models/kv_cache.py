"""A KV cache that grows in place, for decoding.

transformers' `DynamicLayer` appends each decoding step's key and value with `torch.cat`, which copies the whole
cache of every layer at every step: O(length^2) copying per sequence, 12% of generation on the 30M bench model. A
`RoomyLayer` keeps its keys and values as views of buffers with room for the tokens still to come and writes each
new token into them: the same tensors, without the copies. Decoding only: the writes are in place, so it refuses
tensors that need gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class RoomyLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of buffers `room` tokens longer than what they hold."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self._keys: torch.Tensor | None = None     # (batch, heads, capacity, head_dim) buffers
        self._values: torch.Tensor | None = None

    def _fits(self, key_states: torch.Tensor, used: int, need: int) -> bool:
        """Whether the buffers hold the `used` cached tokens and have room for `need`. A batch reorder or repeat
        replaces `keys` with a new tensor (then it is copied into new buffers); a crop keeps a view of them."""
        if self._keys is None or self._keys.shape[:2] != key_states.shape[:2] or need > self._keys.shape[-2]:
            return False
        return used == 0 or (self.keys.data_ptr() == self._keys.data_ptr() and self.keys.stride() == self._keys.stride())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.requires_grad or value_states.requires_grad:
            raise RuntimeError("RoomyLayer writes in place: it is for decoding, not for passes with gradient")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self.get_seq_length()
        need = used + key_states.shape[-2]
        if not self._fits(key_states, used, need):
            self._allocate(key_states, value_states, used, need + self.room)
        self._keys[..., used:need, :] = key_states
        self._values[..., used:need, :] = value_states
        self.keys, self.values = self._keys[..., :need, :], self._values[..., :need, :]
        return self.keys, self.values

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, used: int, capacity: int) -> None:
        """New buffers of `capacity` tokens holding the `used` cached ones (copied once)."""
        batch, heads, _, _ = key_states.shape
        self._keys = key_states.new_empty((batch, heads, capacity, key_states.shape[-1]))
        self._values = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
        if used:
            self._keys[..., :used, :] = self.keys
            self._values[..., :used, :] = self.values


def make_room(cache: Any, room: int) -> Any:
    """Turn `cache`'s dynamic layers into `RoomyLayer`s (same keys and values) with room for `room` more tokens;
    returns `cache`. Other layer kinds (sliding windows) are left as they are."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            roomy = RoomyLayer(room)
            roomy.__dict__.update(layer.__dict__)
            cache.layers[i] = roomy
    return cache
