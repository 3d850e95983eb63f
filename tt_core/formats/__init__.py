"""The formats: tt-adapters' own folders (native), PEFT's, and the folder ``transformers.Trainer`` writes.

They take the adapter records (:mod:`tt_core.records`) and the model, never an AdapterModel.
"""
