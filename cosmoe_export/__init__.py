"""cosmoe-export: convert sparse MoE checkpoints into split, on-device bundles."""

__version__ = "0.1.0"
