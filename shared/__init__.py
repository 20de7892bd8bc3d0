"""emotion-stream's common library: schema, settings, Redis, detection, classification."""

__version__ = "0.1.0"
