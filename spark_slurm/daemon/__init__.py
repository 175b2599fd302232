"""sparkd, the node daemon: socket API, validation pipeline, automations, metrics."""
