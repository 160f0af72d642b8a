"""Serving stage: a thin TorchServe handler over pure functions, the capture store, operations.

decode -> preprocess -> infer -> postprocess are plain functions (serving.inference,
serving.backends), tested without a server; serving.handler only wires them into
TorchServe's handle(data, context) contract.
"""
