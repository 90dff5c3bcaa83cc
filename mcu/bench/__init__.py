"""The benchmark suite behind ``mcu bench`` (entry point: :func:`mcu.bench.cli.main`).

Modules: ``workloads`` (the models, once per architecture, one builder per framework), ``external`` (the
reference article's loops and baal), ``runner`` (the worker process: timing, memory, precision, convergence),
``suite`` (the plan and the workers), ``memory``, ``precision``, ``machine``, ``report`` (tables, CSV, JSON,
plots, Markdown), ``serve`` (``mcu bench --serve``: HTTP load on ``mcu serve`` and on a naive server).
The main process imports no framework; each backend runs in its own worker process.
"""
