"""Loading the Neural Tangents reference cases in ``tests/reference`` and building their nets.

Each ``.npz`` case holds a JSON ``spec`` whose ``layers`` is a list of ``[name, kwargs]`` pairs in
gpntk's layer names; ``["serial", {"layers": [...]}]`` and
``["parallel", {"branches": [[...], ...]}]`` nest (see ``tests/reference/README.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gpntk import layers as L
from gpntk.testing import default_dtype

REFERENCE_DIR = Path(__file__).parent / "reference"

@dataclass(frozen=True)
class ReferenceCase:
    name: str
    spec: dict
    arrays: dict[str, np.ndarray]

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    @property
    def layers(self) -> list:
        return self.spec["layers"]

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


def case_names(prefix: str = "") -> list[str]:
    """Names (file stems) of all stored cases starting with ``prefix``, sorted."""
    return sorted(p.stem for p in REFERENCE_DIR.glob(f"{prefix}*.npz"))


@lru_cache(maxsize=None)
def load_case(name: str) -> ReferenceCase:
    """The case ``tests/reference/{name}.npz`` (cached; its arrays are read-only)."""
    with np.load(REFERENCE_DIR / f"{name}.npz") as data:
        arrays = {key: np.array(data[key]) for key in data.files}
    for array in arrays.values():
        array.flags.writeable = False
    spec = json.loads(str(arrays.pop("spec")))
    return ReferenceCase(name, spec, arrays)


def layer_names(layers: list) -> set[str]:
    """Every layer name used in a (possibly nested) ``[name, kwargs]`` list."""
    names: set[str] = set()
    for name, kwargs in layers:
        names.add(name)
        if name == "serial":
            names |= layer_names(kwargs["layers"])
        elif name == "parallel":
            for branch in kwargs["branches"]:
                names |= layer_names(branch)
    return names


def missing_layers(layers: list) -> set[str]:
    """The names in ``layers`` that ``gpntk.layers`` does not (yet) provide."""
    return {name for name in layer_names(layers) if not hasattr(L, name)}


#: a hook to build some layers differently: ``(name, kwargs) -> layer``, or ``None`` for the default
Override = Callable[[str, dict], "L.Layer | None"]


def build_layers(layers: list, override: Override | None = None) -> list:
    """gpntk layer objects for a ``[name, kwargs]`` list (``serial`` nests)."""
    built = []
    for name, kwargs in layers:
        layer = override(name, kwargs) if override is not None else None
        if layer is None:
            if name == "serial":
                layer = L.serial(*build_layers(kwargs["layers"], override))
            elif name == "parallel":
                branches = [L.serial(*build_layers(b, override)) for b in kwargs["branches"]]
                layer = L.parallel(*branches)
            else:
                layer = getattr(L, name)(**kwargs)
        built.append(layer)
    return built




def build_net(layers: list, override: Override | None = None, dtype: torch.dtype = torch.float64) -> "L.Serial":
    """The architecture of a case as one ``serial`` network, its hyperparameters in ``dtype``.

    The layers are constructed under ``dtype`` as torch's default dtype: ``Dense`` stores its
    raw (softplus-inverse) hyperparameters in the default dtype at construction, so a net built
    in float32 and converted with ``.double()`` afterwards carries σ² values rounded to float32
    (relative errors ~5e-8, far above the 1e-10 of the reference comparison).
    """
    with default_dtype(dtype):
        return L.serial(*build_layers(layers, override))
