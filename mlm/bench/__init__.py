"""Benchmarks run by ``mlm bench``: each module measures against a baseline in the same run."""
