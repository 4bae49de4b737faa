"""Fault tests: real OS processes on a private RabbitMQ, one fault per scenario.

The scenario drivers (``scenarios.py``) are shared with ``bench/faults.py``, which prints the
same runs as a table.
"""
