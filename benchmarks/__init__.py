"""Benchmark scripts of the mcu repository (not installed with mcu).

The suite behind ``mcu bench`` lives in :mod:`mcu.bench`; ``python -m benchmarks`` runs it from a checkout.
The scripts here measure one thing each and import what they share from :mod:`mcu.bench`:
``first_call_memory``, ``page_faults``, ``predict_memory``, ``ray_throughput``. Results: ``RESULTS.md``.
"""
