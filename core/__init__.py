"""The floor under every stage: the contracts the stages meet through and the small tools
they all use. It imports no stage.

The loop's data flows one way, and each arrow is a store owned by one module here:

    trainer -> model_store (core.manifest, core.model_store, core.registry)
            -> serving -> capture store (core.capture_store, replies: core.reply)
            -> labeling -> labels (labels/images/<class>/, read by the trainer)
            -> trainer

Shared tools: core.preprocess (served inputs are built exactly as evaluated ones),
core.classes (the minority rule), core.db, core.fsutil, core.lock, core.failpoints,
core.ports.
"""
