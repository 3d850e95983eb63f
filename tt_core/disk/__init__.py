"""The disk floor: the manifest format and all-or-nothing storage. Above :mod:`tt_core.api` only."""
