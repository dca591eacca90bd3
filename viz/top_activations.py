"""Top activations: for each unit of a layer, the images (and the receptive-field patches) that
activate it most, found in one pass over a dataset without keeping its activations.

Follows Vanrell & Arias, "Understanding and visualizing CNNs" (lecture, Master in Computer Vision
Barcelona), "Neuron Analysis": "Activation maximization methods: Find
the images that maximally activate a neuron", and "Building the Receptive field of a neuron":
1) run an image through the network, 2) obtain the neuron's activation map, 3) "find the part of
the image (with size of the receptive field) that triggered the maximum activation in the feature
map". Also Frans, "Visualizing Features from a Convolutional Neural Network" (blog post, 2016):
"I passed in a whole batch of images and saved the maximum
activations" (here: over a whole dataset, batch by batch).

- `spatial_max` / `max_activations`: step 2 and the argmax of step 3, per image and unit.
- `RunningTopK`: per unit, the k highest of those maxima seen so far, with the image's id,
  the argmax position and optionally a payload (the receptive-field patch, see
  `viz.receptive_field.crop_patches`). O(k) state per unit; `merge` combines two states (e.g.
  the states of DDP ranks), giving exactly what one pass over the union would.
- `content_ids`: image ids computed from the pixels, so that the same image seen twice (DDP's
  sampler repeats images to even out the ranks) counts once without knowing dataset indices.

Ordering (deterministic ties): by value descending, then image id ascending. An image id appears at
most once per unit (its highest value; the first-seen entry among equal values). Within one
image's map the argmax is the first maximum in row-major order. NaN activations are not supported.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from convlens.viz.common import VizError, check_int
from convlens.viz.layers import layer_output

__all__ = ["TopActivationsError", "RunningTopK", "spatial_max", "max_activations", "content_ids"]


class TopActivationsError(VizError):
    """Bad arguments to a top-activation function or state."""


def _check_k(k) -> None:
    check_int("k", k, 1, TopActivationsError, " (entries kept per unit)")


def spatial_max(maps: Tensor, units: Tensor | range | None = None,
                thresholds: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(values [N, C], positions [N, C, 2] long (i, j)): each map's maximum and where it is (the
    first maximum in row-major order), for maps [N, K, h, w], restricted to the maps of `units` ([C]
    indices into K: a tensor, a list or a range) when given.

    `thresholds` [C] (e.g. `RunningTopK.threshold`): the positions are found only for the maps whose
    maximum, in the thresholds' dtype, is at least its unit's threshold (the ones that may enter a
    top); the others get position (-1, -1). Every value, and every position found, is the same as
    without thresholds; the maxima of the other maps are taken without their positions (`amax`,
    about a third of the time of `max` with indices)."""
    if not torch.is_tensor(maps) or maps.dim() != 4:
        raise TopActivationsError(f"maps must be [N, K, h, w] feature maps, got "
                                  f"{list(maps.shape) if torch.is_tensor(maps) else type(maps).__name__}")
    if isinstance(units, range) and units.step == 1 and len(units):
        maps = maps[:, units.start:units.stop]   # a view: no copy of the maps
    elif units is not None:
        maps = maps.index_select(1, torch.as_tensor(list(units) if isinstance(units, range) else units,
                                                     device=maps.device).long())
    w = maps.shape[3]
    flat_maps = maps.flatten(2)
    if flat_maps.shape[2] == 1:   # 1x1 maps: the value itself, at (0, 0)
        return flat_maps[:, :, 0].clone(), torch.zeros(*flat_maps.shape[:2], 2, dtype=torch.long, device=maps.device)
    if thresholds is not None and not bool((thresholds > -torch.inf).any()):
        thresholds = None         # every map may enter (a top with an empty slot): no maximum to take twice
    if thresholds is not None:
        values = _maxima(maps, flat_maps)
        need = values.to(thresholds.dtype) >= thresholds.to(values.device)
        if not bool(need.all()):
            rows, cols = need.nonzero(as_tuple=True)
            if flat_maps.is_contiguous():   # whole rows of the [N * C, h * w] maps: index_select is faster
                chosen = flat_maps.view(-1, flat_maps.shape[2]).index_select(0, rows * values.shape[1] + cols)
            else:
                chosen = flat_maps[rows, cols]
            found, flat = chosen.max(dim=1)      # max returns the first maximal index
            values[rows, cols] = found           # bit for bit what max gives
            positions = torch.full((*values.shape, 2), -1, dtype=torch.long, device=values.device)
            positions[rows, cols] = torch.stack([flat // w, flat % w], dim=-1)
            return values, positions
    values, flat = flat_maps.max(dim=2)   # max returns the first maximal index
    return values, torch.stack([flat // w, flat % w], dim=-1)


def _maxima(maps: Tensor, flat_maps: Tensor) -> Tensor:
    """[N, C]: each map's maximum (`flat_maps.amax(2)`, the same values). Maps in channels-last
    layout (a conv net trained with it, e.g. under `channels_last=true`) are reduced by a max pool
    over the whole map, which runs along the channels: `amax` over their strided spatial axis was
    3-10x slower on a 2-core AVX2 CPU (maps of 16-512 channels; RESULTS.md, section 10)."""
    if (maps.is_floating_point() and not maps.is_contiguous()
            and maps.is_contiguous(memory_format=torch.channels_last)):
        return F.max_pool2d(maps, maps.shape[2:]).flatten(1)
    return flat_maps.amax(dim=2)


def max_activations(model: nn.Module, images: Tensor, layer: str,
                    units: Tensor | range | None = None) -> tuple[Tensor, Tensor]:
    """(values [N, C], positions [N, C, 2]): for each image and unit of `layer` (all, or
    `units`), the maximum activation of its map and its (i, j) position (see `spatial_max`).

    The forward pass runs in eval mode without gradients and stops after `layer`; modes and hooks
    are restored, also on error. LayerError for an unknown layer."""
    return spatial_max(layer_output(model, images, layer), units)


# One random 64-bit weight per element, fixed by this seed: the same ids on every process.
_ID_SEED = 20261122
_id_weights: dict[tuple[int, str], Tensor] = {}


def content_ids(images: Tensor, chunk_elements: int = 2**22) -> Tensor:
    """[N] int64 ids >= 0 computed from the exact bits of each image (a random linear hash of the
    bit patterns modulo 2^64): equal images get equal ids on any process and device; different
    images collide with probability about 2^-40 per pair. Memory: at most `chunk_elements` int64 at once."""
    if not torch.is_tensor(images) or images.dim() < 2:
        raise TopActivationsError("images must be a batch tensor [N, ...]")
    flat = images.detach().reshape(images.shape[0], -1)
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    flat = flat.contiguous().view(bits)
    d = flat.shape[1]
    key = (d, str(flat.device))
    if key not in _id_weights:
        g = torch.Generator().manual_seed(_ID_SEED)
        w = torch.randint(-2**63, 2**63 - 1, (d,), dtype=torch.int64, generator=g) | 1  # odd weights
        _id_weights[key] = w.to(flat.device)
    w = _id_weights[key]
    rows = max(1, chunk_elements // max(d, 1))
    # int64 products and sums wrap modulo 2^64, which keeps the hash exact and order-independent
    ids = torch.cat([(flat[s:s + rows].long() * w).sum(1) for s in range(0, flat.shape[0], rows)])
    return ids & (2**63 - 1)


class RunningTopK:
    """Per unit, the `k` highest values seen, with their image ids, (i, j) positions and an
    optional payload, updated batch by batch.

    State (on the device of the first update): `values` [C, k] (float, -inf in empty slots),
    `image_ids` [C, k] (int64, -1 in empty slots), `positions` [C, k, 2] (long), `payload`
    [C, k, *S] or None, each unit's entries best first (see the module docstring for ties).
    `counts` [C]: how many slots are filled (fewer than k until k distinct images were seen).
    """

    def __init__(self, k: int, num_units: int):
        _check_k(k)
        if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 1:
            raise TopActivationsError(f"num_units must be an int >= 1, got {num_units!r}")
        self.k, self.num_units = k, num_units
        self.values = torch.full((num_units, k), -torch.inf)
        self.image_ids = torch.full((num_units, k), -1, dtype=torch.long)
        self.positions = torch.zeros(num_units, k, 2, dtype=torch.long)
        self.payload: Tensor | None = None

    #: the earlier name of `num_units`
    num_channels = property(lambda self: self.num_units)

    @property
    def counts(self) -> Tensor:
        return (self.image_ids >= 0).sum(1)

    @property
    def threshold(self) -> Tensor:
        """[C]: the value an entry must reach to enter each unit's top k (its k-th value; -inf while
        a slot is empty). An entry below it is never kept, nor its position read."""
        return self.values[:, -1].masked_fill(self.image_ids[:, -1] < 0, -torch.inf)

    def may_enter(self, values: Tensor) -> Tensor:
        """[N] bool: which rows of a batch `values` [N, C] could enter the top k (a value at least
        a unit's current k-th); `update` ignores the others, so their ids need not be known."""
        return (values >= self.threshold.to(values.device, values.dtype)).any(dim=1)

    def update(self, values: Tensor, image_ids: Tensor, positions: Tensor | None = None,
               payload: Callable[[Tensor, Tensor], Tensor] | None = None) -> "RunningTopK":
        """Add a batch: `values` [N, C] (one value per image and unit), `image_ids` [N] (int,
        >= 0), `positions` [N, C, 2] (or None: zeros). `payload(rows, positions)` is called, if
        given, with the batch rows [M] and positions [M, 2] of the entries that enter the top k
        (only those: e.g. cropping M patches, not N * C) and returns [M, *S]. Pass a payload on
        every update or on none. Returns self."""
        values, image_ids, positions = self._check_batch(values, image_ids, positions)
        self._to(values.device)
        # only images at least as high as a unit's k-th value can enter (k distinct ids are
        # strictly better than anything below it): usually few after the first batches
        rows = self.may_enter(values).nonzero().flatten()
        if len(rows) == 0:
            return self
        if len(rows) < values.shape[0]:
            values, image_ids, positions = values[rows], image_ids[rows], positions[rows]
            if payload is not None:
                inner = payload
                payload = lambda r, pos: inner(rows[r], pos)  # noqa: E731 - rows of the full batch
        n, c = values.shape
        # candidates per unit: the current k entries, then the batch's n
        cand_values = torch.cat([self.values, values.t()], dim=1)
        cand_ids = torch.cat([self.image_ids, image_ids[None, :].expand(c, n)], dim=1)
        cand_pos = torch.cat([self.positions, positions.transpose(0, 1)], dim=1)
        pick, live = _select(cand_values, cand_ids, self.k)                    # [C, k] into k + n
        from_batch = (pick >= self.k) & live
        if payload is None and self.payload is not None and bool(from_batch.any()):
            raise TopActivationsError("this top-k keeps a payload: pass payload= on every update")
        if payload is not None and self.payload is None and bool((self.counts > 0).any()):
            raise TopActivationsError("this top-k was updated without a payload: pass payload= on every "
                                      "update or on none")
        new_payload = self.payload
        if payload is not None and bool(from_batch.any()):
            ch, slot = from_batch.nonzero(as_tuple=True)
            fresh = payload(pick[ch, slot] - self.k, cand_pos[ch, pick[ch, slot]])
            if not torch.is_tensor(fresh) or fresh.dim() < 1 or fresh.shape[0] != len(ch):
                raise TopActivationsError(f"payload(rows, positions) must return a tensor with one row per "
                                          f"entry ({len(ch)}), got {getattr(fresh, 'shape', type(fresh))}")
            fresh = fresh.to(values.device)
            if self.payload is None:
                self.payload = fresh.new_zeros(self.num_units, self.k, *fresh.shape[1:])
            new_payload = _gather_slots(self.payload, pick.clamp(max=self.k - 1))
            new_payload[ch, slot] = fresh.to(new_payload.dtype)
        elif self.payload is not None:
            new_payload = _gather_slots(self.payload, pick.clamp(max=self.k - 1))
        self._set(cand_values, cand_ids, cand_pos, pick, live)
        self.payload = new_payload
        return self

    def merge(self, other: "RunningTopK") -> "RunningTopK":
        """Combine with `other` (same k and unit count) in place: the result is what one pass
        over both streams would keep. Returns self."""
        if not isinstance(other, RunningTopK):
            raise TopActivationsError(f"merge needs a RunningTopK, got {type(other).__name__}")
        if (other.k, other.num_units) != (self.k, self.num_units):
            raise TopActivationsError(f"cannot merge a top-{other.k} of {other.num_units} units into "
                                      f"a top-{self.k} of {self.num_units} units")
        dev = self.values.device
        payloads = [self.payload, other.payload.to(dev) if other.payload is not None else None]
        filled = [bool((self.counts > 0).any()), bool((other.counts > 0).any())]
        if any(p is not None for p in payloads):
            shape = next(p for p in payloads if p is not None).shape
            for side in range(2):
                if payloads[side] is None:
                    if filled[side]:
                        raise TopActivationsError("cannot merge a top-k with a payload and one without")
                    payloads[side] = torch.zeros(shape, dtype=next(p for p in payloads if p is not None).dtype,
                                                 device=dev)
                elif payloads[side].shape != shape:
                    raise TopActivationsError(f"payload shapes differ: {list(payloads[0].shape)} vs "
                                              f"{list(payloads[1].shape)}")
        values = other.values.to(device=dev, dtype=self.values.dtype) if filled[1] else \
            torch.full_like(self.values, -torch.inf)
        cand_values = torch.cat([self.values, values], dim=1)
        cand_ids = torch.cat([self.image_ids, other.image_ids.to(dev)], dim=1)
        cand_pos = torch.cat([self.positions, other.positions.to(dev)], dim=1)
        pick, live = _select(cand_values, cand_ids, self.k)
        if payloads[0] is not None:
            self.payload = _gather_slots(torch.cat(payloads, dim=1), pick)
        self._set(cand_values, cand_ids, cand_pos, pick, live)
        return self

    def _set(self, cand_values, cand_ids, cand_pos, pick, live) -> None:
        self.values = cand_values.gather(1, pick).masked_fill(~live, -torch.inf)
        self.image_ids = cand_ids.gather(1, pick).masked_fill(~live, -1)
        self.positions = cand_pos.gather(1, pick[..., None].expand(-1, -1, 2)).masked_fill(~live[..., None], 0)

    def state_dict(self) -> dict[str, Tensor | int | None]:
        """Plain tensors (on the CPU) and ints, e.g. for `torch.distributed.all_gather_object`."""
        return {"k": self.k, "num_units": self.num_units, "values": self.values.cpu(),
                "image_ids": self.image_ids.cpu(), "positions": self.positions.cpu(),
                "payload": self.payload.cpu() if self.payload is not None else None}

    @classmethod
    def from_state_dict(cls, state: dict) -> "RunningTopK":
        # "num_channels": the key in states saved by convlens <= 0.2
        top = cls(int(state["k"]), int(state["num_units"] if "num_units" in state else state["num_channels"]))
        top.values, top.image_ids = state["values"].clone(), state["image_ids"].clone()
        top.positions = state["positions"].clone()
        top.payload = state["payload"].clone() if state.get("payload") is not None else None
        return top

    def _to(self, device: torch.device) -> None:
        if self.values.device != device:
            self.values, self.image_ids = self.values.to(device), self.image_ids.to(device)
            self.positions = self.positions.to(device)
            if self.payload is not None:
                self.payload = self.payload.to(device)

    def _check_batch(self, values, image_ids, positions):
        if not torch.is_tensor(values) or values.dim() != 2 or values.shape[1] != self.num_units:
            got = list(values.shape) if torch.is_tensor(values) else type(values).__name__
            raise TopActivationsError(f"values must be [N, C] = [N, {self.num_units}] (one value per image "
                                      f"and unit), got {got}")
        if values.is_complex() or not values.is_floating_point():
            values = values.double() if not values.is_complex() else values
        image_ids = torch.as_tensor(image_ids, device=values.device)
        if image_ids.shape != (values.shape[0],) or image_ids.is_floating_point():
            raise TopActivationsError(f"image_ids must be an integer tensor [N] = [{values.shape[0]}], "
                                      f"got {image_ids.dtype} {list(image_ids.shape)}")
        image_ids = image_ids.long()
        if image_ids.numel() and image_ids.min() < 0:
            raise TopActivationsError("image_ids must be >= 0 (-1 marks an empty slot)")
        if positions is None:
            positions = torch.zeros(*values.shape, 2, dtype=torch.long, device=values.device)
        elif positions.shape != (*values.shape, 2):
            raise TopActivationsError(f"positions must be [N, C, 2] = {[*values.shape, 2]}, "
                                      f"got {list(positions.shape)}")
        if self.values.dtype != values.dtype and self.counts.sum() == 0:
            self.values = self.values.to(values.dtype)
        return values.to(self.values.dtype), image_ids, positions.long()


def _gather_slots(payload: Tensor, pick: Tensor) -> Tensor:
    """payload [C, M, *S] -> [C, k, *S] at slots pick [C, k]."""
    index = pick.view(*pick.shape, *[1] * (payload.dim() - 2)).expand(-1, -1, *payload.shape[2:])
    return payload.gather(1, index)


def _select(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(pick [C, k] indices into the M candidates of each row, live [C, k] bool), for values and
    ids [C, M]: the k best distinct ids, by value descending then id ascending; `live` is False
    where fewer than k distinct ids exist (empty slots, id -1, are never live)."""
    # 1) order by id, and within an id by value descending (two stable sorts), to find repeats
    order = values.argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, ids.gather(1, order).argsort(dim=1, stable=True))
    sorted_ids = ids.gather(1, order)
    repeat = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    live = ~repeat & (sorted_ids >= 0)
    # 2) live entries first, by value descending; ties keep the id-ascending order of `order`
    # (stable sorts), dropped entries after every live one
    by_value = values.gather(1, order).argsort(dim=1, descending=True, stable=True)
    by_live = live.gather(1, by_value).to(torch.int8).argsort(dim=1, descending=True, stable=True)
    final = by_value.gather(1, by_live)[:, :k]
    return order.gather(1, final), live.gather(1, final)
