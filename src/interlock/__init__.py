"""interlock: put machine-learning models and LLM calls into production."""

__version__ = "0.1.0"

__all__ = ["__version__"]
