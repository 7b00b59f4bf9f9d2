"""Benchmarks: quality on public labelled data (``python -m bench.skab``) and, beside it, performance."""
