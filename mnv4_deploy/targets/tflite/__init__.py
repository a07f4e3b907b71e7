"""TFLite / LiteRT: litert-torch conversion, verified in ai_edge_litert's interpreter (target.py)."""
from .target import TfliteOptions, TfliteTarget

__all__ = ["TfliteOptions", "TfliteTarget"]
