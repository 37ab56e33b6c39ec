"""Tools around the library, not part of it: benchmarks, the demo guard builder and the
loaders of real labelled data that arrives inside registry packages.

- ``bench``: ``guardmerge bench runtime | merge | middleware | search | serve | cli``
- ``serve_bench``: the proxy's benchmark (latency added, throughput, batching on vs off)
- ``merge_bench``: the merge benchmark and the mergekit comparison
- ``build``: fine-tunes the demo's guard heads from a packaged encoder, merges them, and writes
  the comparison table (``guardmerge build-guards``, ``examples/demo.py``)
- ``datasets``: packaged encoder and labelled text, read from installed packages (never imported)

These modules may import anything in guardmerge (the test kit included); nothing in the library
imports them (a test checks it), and the CLI imports them only inside the commands that need
them. Examples use the names listed in each module's ``__all__``.
"""
