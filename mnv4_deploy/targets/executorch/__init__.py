"""ExecuTorch target: the shared PT2E int8 model (or the float model) lowered to an XNNPACK-delegated `.pte`,
verified in ExecuTorch's own runtime (`executorch.runtime`), PyTorch's on-device runtime for Android and iOS."""
from .target import ExecutorchOptions, ExecutorchTarget

__all__ = ["ExecutorchOptions", "ExecutorchTarget"]
