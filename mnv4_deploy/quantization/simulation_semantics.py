"""Which integer arithmetic a PyTorch simulation computes: PyTorch's exact one, or a runtime's own where it is
known and modelled (mnv4_deploy/targets/qnn/htp_semantics.py for Qualcomm HTP). Targets name theirs
(`Target.simulation_semantics`); `QuantizedModel.simulation_module` builds one graph per semantics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Semantics:
    """The integer arithmetic a simulation reproduces; `rewrite` turns the converted PT2E graph into it."""

    key: str
    description: str
    rewrite: Optional[Callable[[torch.fx.GraphModule], torch.fx.GraphModule]] = None

    def to_dict(self) -> dict[str, str]:
        return {"semantics": self.key, "description": self.description}


EXACT = Semantics("exact", "PyTorch's quantize/dequantize: exact requantization, rounding half to even")
