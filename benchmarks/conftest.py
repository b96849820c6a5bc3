"""pytest-benchmark suite settings: which bigipc is being measured.

The suite is run on its own (``pytest benchmarks --benchmark-only``); the
repository's ``testpaths`` keep a plain ``pytest`` from collecting it.
"""


def pytest_report_header(config):
    import bigipc
    from bigipc import _bench

    return "bigipc %s, %s core, from %s; child processes start by %s" % (
        bigipc.__version__,
        bigipc.IMPLEMENTATION,
        bigipc.__file__,
        _bench.default_start_method(),
    )
