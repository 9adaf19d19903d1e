"""Subnet descriptions: how many heads and FFN neurons each encoder layer keeps."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eftnas_cli.errors import SubnetError

from .adapters import encoder_dims


def _check_width(name: str, value) -> None:
    # bool is an int subclass, but True heads is certainly a mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise SubnetError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise SubnetError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class LayerWidth:
    """Widths one encoder layer keeps: the first `heads` heads and first `neurons` FFN neurons."""

    heads: int
    neurons: int

    def __post_init__(self):
        _check_width("heads", self.heads)
        _check_width("neurons", self.neurons)


@dataclass(frozen=True)
class Subnet:
    """One LayerWidth per encoder layer. Hashable, so it can key caches."""

    layers: tuple[LayerWidth, ...]

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for index, layer in enumerate(self.layers):
            if not isinstance(layer, LayerWidth):
                raise SubnetError(f"layer {index} must be a LayerWidth, got {layer!r}")

    def to_dict(self) -> dict:
        return {"layers": [{"heads": w.heads, "neurons": w.neurons} for w in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> Subnet:
        """Inverse of to_dict; ValueError names what is wrong with malformed input."""
        if not isinstance(data, dict) or set(data) != {"layers"}:
            raise SubnetError(f'a subnet must be a dict with exactly the key "layers", got {data!r}')
        if not isinstance(data["layers"], list):
            raise SubnetError(f'"layers" must be a list, got {data["layers"]!r}')
        layers = []
        for index, entry in enumerate(data["layers"]):
            if not isinstance(entry, dict) or set(entry) != {"heads", "neurons"}:
                raise SubnetError(
                    f'layer {index} must be a dict with exactly the keys "heads" and "neurons", got {entry!r}'
                )
            try:
                layers.append(LayerWidth(heads=entry["heads"], neurons=entry["neurons"]))
            except ValueError as error:
                raise SubnetError(f"layer {index}: {error}") from None
        return cls(tuple(layers))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> Subnet:
        """The subnet in a JSON file; SubnetError names the file when it is missing or malformed."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, UnicodeDecodeError) as error:
            raise SubnetError(f"{path}: cannot read the subnet file ({getattr(error, 'strerror', None) or error})") from None
        except json.JSONDecodeError as error:
            raise SubnetError(f"{path}: not valid JSON ({error.msg})") from None
        except SubnetError as error:
            raise SubnetError(f"{path}: {error}") from None

    def describe(self) -> str:
        """Compact widths: `heads/neurons` per layer."""
        return " ".join(f"{layer.heads}/{layer.neurons}" for layer in self.layers)


def exported_subnet(config) -> Subnet | None:
    """The subnet an exported model's config records (`eftnas_subnet`), None for a dense model.

    An export's config keeps its parent's full dimensions, so the subnet reads against those.
    """
    recorded = getattr(config, "eftnas_subnet", None)
    return None if recorded is None else Subnet.from_dict(recorded)


def full_subnet(config) -> Subnet:
    """The subnet that keeps every head and neuron of every layer."""
    dims = encoder_dims(config)
    return Subnet(tuple(LayerWidth(dims.heads, dims.neurons) for _ in range(dims.num_layers)))


def validate_subnet(config, subnet: Subnet) -> None:
    """ValueError unless `subnet` fits the encoder described by `config`."""
    dims = encoder_dims(config)
    if len(subnet.layers) != dims.num_layers:
        raise SubnetError(f"subnet has {len(subnet.layers)} layers, the model has {dims.num_layers}")
    for index, width in enumerate(subnet.layers):
        if not 0 <= width.heads <= dims.heads:
            raise SubnetError(f"layer {index}: heads={width.heads} is outside [0, {dims.heads}]")
        if not 0 <= width.neurons <= dims.neurons:
            raise SubnetError(f"layer {index}: neurons={width.neurons} is outside [0, {dims.neurons}]")
