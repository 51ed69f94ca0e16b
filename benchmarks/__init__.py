"""Benchmarks of cfjax against PyTorch twins (parity-checked), run with ``cfjax bench`` or
``python -m benchmarks.run``. Needs the ``bench`` extra (torch, FrEIA) and a repository checkout."""
