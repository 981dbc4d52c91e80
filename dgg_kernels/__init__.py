"""dgg-kernels: Dynamic Gradient Gating for sample-efficient RLVR, fused into one GPU launch."""
from .autograd import GatedLinear, gated_linear
from .config import GateConfig
from .gate import DynamicGradientGate
from .loop import reuse_passes

__version__ = "0.1.0"

__all__ = ["DynamicGradientGate", "GateConfig", "GatedLinear", "gated_linear", "reuse_passes", "__version__"]
