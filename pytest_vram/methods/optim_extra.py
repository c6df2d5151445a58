"""Filled in by the methods issue."""

REGISTER: list[object] = []
