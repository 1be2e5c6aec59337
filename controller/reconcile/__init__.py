"""Reconciliation: the work queue, the workers that drain it, and (next) the reconciler."""
