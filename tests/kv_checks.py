"""What the KV pools may hold once an engine is idle: nothing but cached prefixes."""


def assert_only_cache_holds_kv(stats: dict) -> None:
    """Every KV slot in use belongs to a cached prefix no running request reads (so nothing
    leaked): `Driver.stats()` counts both per instance. Without prefix caching both are 0."""
    assert stats["kv_used_tokens"] == stats["kv_cached_tokens"], (
        f"KV in use {stats['kv_used_tokens']} beyond the cached prefixes {stats['kv_cached_tokens']}"
    )
