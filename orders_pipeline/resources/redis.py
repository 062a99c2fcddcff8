"""The Redis resource: where the queue, dedup window, lookup cache and signals live."""

import redis

from orders_pipeline.connections import redis_client
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.resources.declared import declared_fields, settings_of
from orders_pipeline.settings import RedisSettings


class RedisResource(declared_fields(RedisSettings)):  # type: ignore[misc]
    """Redis holding the ingestion queue, dedup window, lookup cache and signals.

    Fields: those of `RedisSettings` (REDIS_* variables). One pooled client per process;
    every key starts with `key_prefix`.
    """

    def settings(self) -> RedisSettings:
        """The plain settings (ConfigError naming the variable if a value is out of range)."""
        return settings_of(self, RedisSettings)

    def client(self) -> redis.Redis:
        return redis_client(self.settings())

    def key_space(self) -> RedisKeys:
        return RedisKeys(self.key_prefix, self.shards)
