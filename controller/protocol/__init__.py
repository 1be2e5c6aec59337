"""The controller's side of the plugin protocol (``blackhole.plugin.v1``)."""
