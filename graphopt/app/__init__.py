"""The application layer over the spine: pipeline files, task metrics and latency
measurement, used by the command line and the compress search (never by passes)."""
