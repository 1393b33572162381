"""aligned-probing: relate toxic behaviour to model internals."""

__version__ = "0.1.0"
