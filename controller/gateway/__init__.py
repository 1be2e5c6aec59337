"""The gateway: one stable name per plugin, calls routed to its active instance."""
