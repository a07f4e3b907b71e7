"""CoreML: ML Program (.mlpackage), verified by Core ML's predict on macOS and by this project's ML Program
executor (mlprogram/) everywhere (target.py)."""
from .target import CoremlOptions, CoremlTarget

__all__ = ["CoremlOptions", "CoremlTarget"]
