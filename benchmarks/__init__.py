"""Throughput and memory benchmarks of jaxdp against its peers (run with ``pytest benchmarks/``)."""
