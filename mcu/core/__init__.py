"""Orchestration: argument checks, backend and strategy resolution, and streaming of samples."""
