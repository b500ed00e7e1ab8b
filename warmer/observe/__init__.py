"""What the worker tells its operators: structured logs (`warmer.observe.log`).

Metrics and health endpoints arrive here in a later version.
"""
