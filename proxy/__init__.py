"""ollamon: a transparent monitoring proxy for Ollama."""

__version__ = "0.1.0"
