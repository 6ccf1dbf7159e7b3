"""Placeholder until the checks land."""

CHECKS: dict = {}
