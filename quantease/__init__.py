"""quantease: post-training weight quantization of causal LMs (QuantEase, GPTQ, RTN), one decoder block at a time."""
__version__ = "0.1.0"
