"""The durable state store: plugins' exported state, kept as versioned snapshots."""
