"""Where desired state comes from: a watched directory of spec files (and, later, Kubernetes)."""
