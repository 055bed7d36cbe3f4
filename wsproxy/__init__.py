"""wsproxy: a WebSocket-aware L7 load balancer built on trio, h11 and wsproto."""

__version__ = "0.1.0"
