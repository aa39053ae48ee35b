"""Triton kernels and their launchers, one op family per file. Installed as ``etfkern.triton_kernels``
(never top-level: OpenAI ships a ``triton_kernels`` package). Imported lazily by :mod:`etfkern._core.backend`."""
