"""The Redis resource: connection settings plus the tunables of the Redis patterns."""

import dagster as dg
import redis
from pydantic import Field

from orders_pipeline.connections import redis_client
from orders_pipeline.redis_patterns.keys import RedisKeys
from orders_pipeline.settings import RedisSettings


class RedisResource(dg.ConfigurableResource):
    """Redis holding the ingestion queue, dedup window, lookup cache and signals.

    One pooled client per process; every key starts with `key_prefix`.
    """

    host: str = Field(default="127.0.0.1", description="REDIS_HOST")
    port: int = Field(default=6379, description="REDIS_PORT")
    db: int = Field(default=0, description="REDIS_DB")
    username: str | None = Field(default=None, description="REDIS_USERNAME (ACL user)")
    # repr=False: a resolved resource (inside a run) must not print its secret.
    password: str | None = Field(default=None, description="REDIS_PASSWORD", repr=False)
    ssl: bool = Field(default=False, description="REDIS_SSL (TLS, certificates verified)")
    ssl_ca_certs: str | None = Field(default=None,
                                     description="REDIS_SSL_CA_CERTS (CA bundle for TLS)")
    key_prefix: str = Field(default="orders", description="REDIS_KEY_PREFIX")
    dedup_window_seconds: int = Field(default=3600, description="DEDUP_WINDOW_SECONDS")
    max_queue_depth: int = Field(default=1_000_000, description="MAX_QUEUE_DEPTH")
    lookup_ttl_seconds: int = Field(default=90_000, description="LOOKUP_TTL_SECONDS")
    claim_timeout_seconds: int = Field(default=60, description="CLAIM_TIMEOUT_SECONDS")

    def settings(self) -> RedisSettings:
        return RedisSettings(host=self.host, port=self.port, db=self.db, username=self.username,
                             password=self.password, ssl=self.ssl,
                             ssl_ca_certs=self.ssl_ca_certs, key_prefix=self.key_prefix)

    def client(self) -> redis.Redis:
        return redis_client(self.settings())

    def key_space(self) -> RedisKeys:
        return RedisKeys(self.key_prefix)
