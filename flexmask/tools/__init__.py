"""flexmask's tools: the command line (:mod:`flexmask.tools.cli`), mask expressions read from text
without running code (:mod:`flexmask.tools.expr`), and the benchmarks (:mod:`flexmask.tools.bench`).

Nothing here is needed to use the library; ``import flexmask`` does not import this package.
"""
