"""Shared pieces of visionloop: the model manifest, the model_store layout and the CLI.

The stage packages (trainer, serving, labeling) import from here and never from
each other; they meet through the manifest and model_store/.
"""

__version__ = "0.1.0"
