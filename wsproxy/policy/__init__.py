"""Decisions about sessions and backends, sans I/O: balancing (candidate iterators), routing and
path normalisation, the health state machine, admission, rate limits, origins, the bounded
tables keyed by client input, the configuration snapshot and the reload plan."""
