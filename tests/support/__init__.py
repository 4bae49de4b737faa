"""Helpers for the tests: stand-in servers and fixtures shared across test directories."""
