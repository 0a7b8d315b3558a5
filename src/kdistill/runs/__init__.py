"""Recipes: runs built from a YAML config, the fine-tune-once teacher, experiment grids, demos, the cache command.

Nothing in the library imports this package; the CLI calls it.
"""
