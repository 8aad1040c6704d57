"""Thin adapters that run ``gradscope.watch`` inside training frameworks.

Each lives in its own module and imports its framework only there:
``gradscope.integrations.lightning.GradscopeCallback`` (``pip install gradscope[lightning]``)
and ``gradscope.integrations.huggingface.GradscopeTrainerCallback``
(``pip install gradscope[transformers]``).
"""
