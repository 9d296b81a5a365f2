"""Running on this machine: the distribution strategy (strategy), device and precision policy (device), process
set-up (process), Keras fixes (compat), the environment variables read (environment), log lines and progress output."""
