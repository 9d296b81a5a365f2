"""Running on this machine: the distribution strategy, device and precision settings, process set-up, Keras fixes,
log lines and progress output."""
