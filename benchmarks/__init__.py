"""The mcu benchmark suite: ``mcu bench`` / ``python -m benchmarks`` (see ``benchmarks/__main__.py``).

Modules: ``workloads`` (the models, once per architecture, one builder per framework), ``external`` (the
reference article's loops and baal), ``runner`` (the worker process: timing, memory, precision, convergence),
``suite`` (the plan and the workers), ``memory``, ``precision``, ``machine``, ``report`` (tables, CSV, JSON,
plots, Markdown).
"""
