"""The ``kaas bench`` benchmarks, one module each: ``overhead`` (per-call cost against
Dask, ipyparallel and a Pipe), ``kernels`` (warm kernel calls and a kept-data chain against
in-process calls), ``paper`` (the seed paper's completion-time table, naive fresh processes
against the warm pool), ``load`` (concurrent clients, then a memory soak) and ``faults``
(the fault table ``kaas bench load --faults`` injects). ``common`` holds what they share.
Each prints figures measured in one run on one machine.
"""
