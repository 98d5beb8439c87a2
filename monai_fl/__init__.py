"""monai-fl: federated learning for medical imaging (MONAI tasks, NVFlare runtime, HE aggregation)."""

__version__ = "0.1.0"
