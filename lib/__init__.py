"""Shared ML core: presets, tokenizer, data, modeling, training and inference.

`lib` never imports `ml_service`; training and serving both build on the modules here.
"""

__version__ = "0.1.0"
