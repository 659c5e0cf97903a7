"""Reproducible throughput, latency and overhead measurements (``python -m benchmarks.run``).

Every figure is a ratio of two things measured side by side in one run, on the
same PostgreSQL and broker, because absolute times on a shared machine drift.
"""
