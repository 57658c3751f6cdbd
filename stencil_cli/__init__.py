"""stencil: subject-driven image generation with Context Guidance (the Stencil method)."""

__version__ = "0.1.0"
