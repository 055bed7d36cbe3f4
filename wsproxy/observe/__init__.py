"""What wsproxy shows of itself, sans I/O: the Prometheus metrics, the one log record per
session, and the data behind the status page."""
