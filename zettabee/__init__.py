"""zettabee: ZFS remote replication that the monitoring system can watch."""

__version__ = "0.1.0"
