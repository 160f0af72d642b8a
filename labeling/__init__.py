"""Labeling stage: Label Studio push/pull (to come)."""
