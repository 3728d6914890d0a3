"""biodino: self-supervised training of image encoders for photographs of living organisms."""

__version__ = "0.1.0"
