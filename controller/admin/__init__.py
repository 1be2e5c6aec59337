"""The local admin API: what ``bhctl`` talks to on a running single-host controller."""
