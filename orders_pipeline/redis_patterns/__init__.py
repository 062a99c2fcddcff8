"""Redis patterns: queue, dedup window, lookup cache, signals, time window, backpressure."""
