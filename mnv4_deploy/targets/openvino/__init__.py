"""OpenVINO: IR from the torch.export program, int8 as FakeQuantize (or NNCF), verified on the CPU plugin (target.py)."""
from .target import OpenVinoOptions, OpenVinoTarget

__all__ = ["OpenVinoOptions", "OpenVinoTarget"]
