"""umt-distill: Unmasked Teacher video pretraining with a cached frozen teacher."""

__version__ = "0.1.0"
