"""The top of visionloop: the `visionloop` command and the loop that drives every stage
(`visionloop retrain`, `visionloop demo`).

Layers, checked by `make lint` (import-linter, pyproject.toml): visionloop imports the
stages; trainer, serving and labeling import only core and never each other, except the
one declared edge labeling.predictor -> serving.offline (the ML backend runs the served
path in-process); core imports none of them.
"""
