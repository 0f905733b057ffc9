"""Helpers every layer may use: argument parsing, config checks, paths, lazy exports, table and JSON files,
safe checkpoint files. Nothing here imports another part of the plugin."""
