"""General Instance Distillation (Dai et al., CVPR 2021) for torchvision detectors."""

__version__ = "0.1.0"
