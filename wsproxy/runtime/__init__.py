"""The trio shell: the only layer that waits on sockets, clocks and signals. The server and its
accept loop, the session's handshake phase, the shared readiness loop that drives every relay,
timers, streams, upstream connects, the health checker, the auth client, the admin listener and
the supervisor. Decisions are made by the pure layers; this one carries them out."""
