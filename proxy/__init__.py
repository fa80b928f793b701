"""ollamon: a transparent monitoring proxy for Ollama."""

from storage.version import VERSION as __version__

__all__ = ["__version__"]
