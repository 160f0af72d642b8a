"""Labeling stage: Label Studio, push and pull, and its ML backend.

Push reads the capture store (core.capture_store) and makes the most useful captures
Label Studio tasks; pull brings finished annotations back as an ImageFolder tree the
trainer reads; the ML backend pre-annotates tasks with the served path in-process and
receives Label Studio's webhooks.
"""
