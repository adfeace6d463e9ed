"""Media generators for tests, benchmarks and the quickstart: real files, made on the spot, offline.

``umt_distill.testing.media`` encodes videos and images with PyAV and PIL (frames that carry their own
index, moving shapes) so that a test can compare decoded frames exactly and a benchmark or the
quickstart's toy world can make its own corpus. The library itself never imports this package: it sits
above every library layer and below only the quickstart and the CLI (``tests/unit/test_layers.py``).
"""
