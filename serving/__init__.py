"""Serving stage: TorchServe handler and operations (to come)."""
