"""Nested depth levels: whole layers dropped at sparse levels (``dsnn prune --depth``, ``docs/depth.md``).

A *stack* is a list of residual layers whose parameters share a prefix (``model.decoder.layers.<i>.``). A depth plan
gives the order in which its layers are dropped and how many are dropped at each level; because every level drops a
prefix of the same order and the counts never fall as levels grow, a layer dropped at one level is dropped at every
sparser level (nested by construction). At least one layer of a stack always stays.

A dropped layer is coded like pruned weights: **every** parameter of the layer (weights, biases, norms) gets a keep
code no higher than the last level at which the layer is alive. In a pre-norm residual layer (Whisper's) zeroing all
of them makes the layer the identity: its norms output 0, every projection of 0 with zero bias is 0, and only the
residual passes. So the masked forward of joint training and the in-place switch run a dropped layer as skipped,
and an export removes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import DsnnError, UsageError
from .levels import Levels, level_label, parse_level

DEPTH_VERSION = 1


@dataclass(frozen=True)
class StackDepth:
    """The depth plan of one stack: ``order`` (layer indices, first dropped first) and ``dropped[k-1]`` layers
    dropped at level ``k``."""

    name: str
    """The stack's parameter prefix, e.g. ``model.decoder.layers``."""
    layers: int
    order: tuple[int, ...]
    dropped: tuple[int, ...]
    chosen_by: str = "given"
    """How the order was chosen: ``importance`` (measured), ``first-last`` (keep the ends), ``given``."""

    def check(self, num_levels: int) -> None:
        """ValueError describing the first inconsistency."""
        if sorted(self.order) != list(range(self.layers)):
            raise ValueError(f"order {list(self.order)} is not a permutation of {self.layers} layers")
        if len(self.dropped) != num_levels:
            raise ValueError(f"{len(self.dropped)} drop counts for {num_levels} levels")
        if any(not 0 <= d < self.layers for d in self.dropped):
            raise ValueError(f"drop counts {list(self.dropped)} must be in [0, {self.layers - 1}]")
        if any(b < a for a, b in zip(self.dropped, self.dropped[1:])):
            raise ValueError(f"drop counts {list(self.dropped)} fall as levels grow")

    def layer_codes(self) -> list[int]:
        """Keep code of each layer: the number of sparse levels at which it is alive."""
        codes = [len(self.dropped)] * self.layers
        for position, layer in enumerate(self.order):
            codes[layer] = sum(1 for d in self.dropped if d <= position)
        return codes

    def dropped_at(self, level_index: int) -> list[int]:
        """Layers dropped at level ``level_index`` (0 = dense: none), in drop order."""
        return [] if level_index == 0 else list(self.order[: self.dropped[level_index - 1]])

    def to_json(self) -> dict:
        """JSON form stored in the bundle."""
        return {"name": self.name, "layers": self.layers, "order": list(self.order), "dropped": list(self.dropped),
                "chosen_by": self.chosen_by}

    @classmethod
    def from_json(cls, data: Mapping) -> StackDepth:
        """Inverse of :meth:`to_json` (KeyError/TypeError/ValueError on malformed input)."""
        return cls(str(data["name"]), int(data["layers"]), tuple(int(i) for i in data["order"]),
                   tuple(int(d) for d in data["dropped"]), str(data.get("chosen_by", "given")))


def parse_depth(spec: str, levels: Sequence[float], layers: int, option: str = "--depth") -> tuple[int, ...]:
    """Drop counts per level from ``LEVEL:N,...`` (UsageError naming the problem).

    A level not named drops as many layers as the nearest denser named level (none below the first); every named
    level must be one of ``levels``; counts must not fall as levels grow and must leave at least one layer.
    """
    named: dict[int, int] = {}
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        level_text, sep, count_text = item.partition(":")
        if not sep:
            raise UsageError(f"{option} {item!r} is not LEVEL:LAYERS", f"e.g. {option} 0.5:1,0.7:2")
        try:
            count = int(count_text)
        except ValueError:
            raise UsageError(f"{option} {item!r}: {count_text!r} is not a whole number of layers",
                             f"e.g. {option} 0.5:1") from None
        index = Levels(tuple(levels)).index(parse_level(level_text), "--levels")
        if index == 0:
            raise UsageError(f"{option} {item!r}: the dense level keeps every layer", "name a sparse level")
        if index in named:
            raise UsageError(f"{option} names level {level_text} twice")
        if count < 0:
            raise UsageError(f"{option} {item!r}: a negative number of layers")
        if count >= layers:
            raise UsageError(f"{option} {item!r} drops {count} of {layers} layers: every layer would be removed",
                             f"drop at most {layers - 1}")
        named[index] = count
    if not named:
        raise UsageError(f"{option} is empty", f"e.g. {option} 0.5:1,0.7:2, or {option} auto")
    counts, current = [], 0
    for index in range(1, len(levels) + 1):
        current = named.get(index, current)
        counts.append(current)
    if any(b < a for a, b in zip(counts, counts[1:])):
        shown = ", ".join(f"{level_label(lv)}:{c}" for lv, c in zip(levels, counts))
        raise UsageError(f"{option} drops fewer layers at a sparser level ({shown}); depth levels must be nested",
                         "give non-decreasing layer counts as levels grow")
    return tuple(counts)


def auto_counts(levels: Sequence[float], layers: int) -> tuple[int, ...]:
    """``--depth auto``: at level ``s`` drop ``floor(s * layers)`` layers (at most ``layers - 1``)."""
    return tuple(min(layers - 1, int(level * layers + 1e-9)) for level in levels)


def first_last_order(layers: int) -> tuple[int, ...]:
    """Distil-whisper's choice as a drop order: the middle layers first, alternating outwards; the first and the last
    layer go last (of 4: 1, 2, 0, 3... except that the first and last are kept as long as possible)."""
    middle = list(range(1, layers - 1))
    order: list[int] = []
    while middle:
        order.append(middle.pop(len(middle) // 2))
    return tuple(order + ([0, layers - 1] if layers > 1 else [0]))


def layer_tensors(stack: StackDepth, names: Sequence[str]) -> dict[int, list[str]]:
    """The parameter names of each layer of ``stack`` (``<stack>.<i>.*``)."""
    out: dict[int, list[str]] = {i: [] for i in range(stack.layers)}
    prefix = stack.name + "."
    for name in names:
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit() and int(head) < stack.layers:
                out[int(head)].append(name)
    return out


def apply_depth(stacks: Sequence[StackDepth], tensors: Mapping[str, torch.Tensor],
                codes: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``codes`` with every parameter of each dropped layer capped at the layer's code (tensors not coded yet get
    codes: all of a layer goes)."""
    out = dict(codes)
    for stack in stacks:
        layer_code = stack.layer_codes()
        for layer, names in layer_tensors(stack, list(tensors)).items():
            if layer_code[layer] == len(stack.dropped):
                continue
            for name in names:
                cap = torch.full(tensors[name].shape, layer_code[layer], dtype=torch.uint8)
                out[name] = torch.minimum(out[name], cap) if name in out else cap
    return out


def dropped_layers(stacks: Sequence[StackDepth], level_index: int) -> dict[str, list[int]]:
    """``{stack name: layers dropped at level_index}`` (stacks that drop none at that level are left out)."""
    out = {stack.name: stack.dropped_at(level_index) for stack in stacks}
    return {name: layers for name, layers in out.items() if layers}


def in_dropped_layer(name: str, dropped: Mapping[str, Sequence[int]]) -> bool:
    """True when ``name`` (a tensor or group-set name) lies inside a dropped layer ``<stack>.<i>.``."""
    for stack, layers in dropped.items():
        prefix = stack + "."
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit() and int(head) in layers:
                return True
    return False


def renumbered(name: str, dropped: Mapping[str, Sequence[int]]) -> str:
    """``name`` of a kept layer's tensor in the smaller model: its layer index minus the dropped layers before it."""
    for stack, layers in dropped.items():
        prefix = stack + "."
        if name.startswith(prefix):
            head, _, rest = name[len(prefix):].partition(".")
            if head.isdigit():
                index = int(head) - sum(1 for i in layers if i < int(head))
                return f"{prefix}{index}" + (f".{rest}" if rest else "")
    return name


def compact_depth(tensors: Mapping[str, torch.Tensor], dropped: Mapping[str, Sequence[int]]
                  ) -> dict[str, torch.Tensor]:
    """The smaller model's tensors: the dropped layers' left out, the kept layers renumbered 0..n-1."""
    return {renumbered(name, dropped): tensor for name, tensor in tensors.items()
            if not in_dropped_layer(name, dropped)}


def parse_depth_metadata(src: object, meta: object, levels: Sequence[float]) -> list[StackDepth]:
    """The ``depth`` entry of a bundle (DsnnError when malformed)."""
    bad = "the bundle is corrupt; re-create it with dsnn prune --depth"
    if not isinstance(meta, dict) or meta.get("version") != DEPTH_VERSION or not isinstance(meta.get("stacks"), list):
        raise DsnnError(f"{src}: metadata 'depth' is not a version-{DEPTH_VERSION} depth description", bad)
    stacks = []
    for entry in meta["stacks"]:
        try:
            stack = StackDepth.from_json(entry)
            stack.check(len(levels))
        except (KeyError, TypeError, ValueError) as exc:
            raise DsnnError(f"{src}: a depth entry is malformed ({exc})", bad) from None
        stacks.append(stack)
    return stacks


def depth_metadata(stacks: Sequence[StackDepth]) -> dict:
    """The JSON value of a bundle's ``depth`` key."""
    return {"version": DEPTH_VERSION, "stacks": [s.to_json() for s in stacks]}


def check_depth_codes(src: object, stacks: Sequence[StackDepth], tensors: Mapping[str, torch.Tensor],
                      codes: Mapping[str, torch.Tensor]) -> None:
    """Every parameter of a dropped layer must be pruned at the levels that drop it (DsnnError otherwise)."""
    for stack in stacks:
        layer_code = stack.layer_codes()
        for layer, names in layer_tensors(stack, list(tensors)).items():
            for name in names:
                if layer_code[layer] < len(stack.dropped) and (
                        name not in codes or int(codes[name].max()) > layer_code[layer]):
                    raise DsnnError(f"{src}: {name} is not pruned at the levels that drop layer {layer} of "
                                    f"{stack.name}", "the bundle is corrupt (or was edited); re-create it")
