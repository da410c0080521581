"""Process-wide JAX settings o2v-jax changes, in one place.

JAX reads some settings once per process (the persistent compilation cache, the number
of CPU devices, a distributed cluster), so changing them is a decision about the whole
process, not about one model: the library does it only here, when a caller asks.
"""

from __future__ import annotations

from pathlib import Path

import jax


def enable_compilation_cache(path: str | Path) -> None:
    """Use JAX's persistent compilation cache in ``path`` (process-wide setting).

    JAX skips caching compiles faster than 1 s by default; inference buckets of a small
    model compile in tens of milliseconds each, so the threshold is set to 0.
    """
    from jax.experimental.compilation_cache import compilation_cache

    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides once per process whether the cache is used (at the first compile);
    # forget that decision so a cache set after something compiled still takes effect.
    compilation_cache.reset_cache()
