"""The adapter methods shipped with tt-adapters, each a tt_core plugin."""
