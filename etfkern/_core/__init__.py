"""Machinery shared by every family: the compiled library, backend choice, the op library, checks, dtypes.

Nothing here imports a family; families import from here (arrows run API -> family ops -> _core.backend ->
kernels)."""
