"""The plugin API, the bottom floor: errors, the hook contract, the config base, method registration.

Imports nothing else of tt_core. A plugin may import it (and :mod:`tt_core.tensors`).
"""
