"""dlbase: train MLPs on MNIST from a YAML file, fast, on the device."""

__version__ = "0.1.0"
