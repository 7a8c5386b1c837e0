"""Validation: seeded inputs, the comparison of outputs, and the validation loop.

Mapping exported artifacts to their runners lives above this layer, in ``export/validation.py``;
the runners themselves (the MIL executor among them) in ``odconv_deploy/runners``.
"""
