# SPDX-License-Identifier: Apache-2.0
"""Helpers for the meta-lamadist classes, importable as lamadist.<module> (addpylib in layer.conf)."""
