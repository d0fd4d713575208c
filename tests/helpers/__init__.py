"""Helpers shared by the test modules (no tests here): extra architectures, odd models for tracing,
on-disk dataset writers, and the process/zygote tools of the reliability tests.

Imported as ``from tests.helpers.<module> import ...``; shared fixtures live in ``tests/conftest.py``.
"""
