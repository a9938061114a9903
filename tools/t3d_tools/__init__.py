"""Glue shared by the launch scripts in tools/: config loading, run data plumbing, checkpoints.

No model math lives here: models, losses and metrics come from the t3d packages.
"""
