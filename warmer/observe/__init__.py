"""What the worker tells its operators: structured logs (`warmer.observe.log`), Prometheus
metrics (`warmer.observe.metrics`), and health, readiness and metrics over HTTP
(`warmer.observe.http`, when `WARMER_HTTP` names an address).
"""
