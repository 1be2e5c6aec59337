"""Prometheus metrics: the controller's actions, the gateway's calls, each instance's resources."""
