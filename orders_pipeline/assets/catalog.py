"""What the Dagster catalog shows: the key prefix in use, Redis URIs, markdown-safe text.

Asset definitions write Redis keys with the placeholder `{P}` (descriptions, metadata) and
name the Redis key (or key pattern) they stand for under the metadata key `REDIS_KEY`;
`rendered` turns them into what this deployment uses when the code location loads.
"""

import re
from collections.abc import Callable
from urllib.parse import quote

import dagster as dg

from orders_pipeline.settings import RedisSettings

PREFIX = "{P}"
REDIS_KEY = "redis_key"
URI = "dagster/uri"  # the UI links an asset to its storage by this key
# The character that makes markdown read the start of a text as a block (quote, heading, list,
# rule, table): group 2, after any indentation and an ordered list's number (group 1).
_BLOCK_START = re.compile(r"^(\s*(?:\d+(?=[.)]))?)((?<=\d)[.)]|[>#*+\-|])")


def markdown_safe(text: str) -> str:
    """`text` with a leading markdown block marker escaped (`> 0` stays `> 0`, not a quote)."""
    return _BLOCK_START.sub(lambda m: f"{m.group(1)}\\{m.group(2)}", text, count=1)


def redis_uri(settings: RedisSettings, key: str) -> str:
    """`redis[s]://host:port/db/key` for a Redis key or key pattern; never a credential."""
    scheme = "rediss" if settings.ssl else "redis"
    return f"{scheme}://{settings.host}:{settings.port}/{settings.db}/{quote(key, safe=':*{}')}"


def _with_prefix(value: object, prefix: str) -> object:
    """Text (plain or a text metadata value) with `{P}` replaced; anything else unchanged."""
    if isinstance(value, dg.TextMetadataValue):
        value = value.value
    return value.replace(PREFIX, prefix) if isinstance(value, str) else value


def rendered(settings: RedisSettings) -> Callable[[dg.AssetSpec], dg.AssetSpec]:
    """A spec mapper (for `dg.map_asset_specs`) filling in the prefix of `settings`.

    In a spec that names Redis keys (`{P}` in its description, or a `REDIS_KEY`), every `{P}`
    in the description and in text metadata becomes the prefix, the description ends by naming
    the prefix and the variable it comes from, and `dagster/uri` points at its `REDIS_KEY`.
    Other specs are returned unchanged.
    """
    prefix = settings.key_prefix

    def render(spec: dg.AssetSpec) -> dg.AssetSpec:
        text = spec.description or ""
        if PREFIX not in text and REDIS_KEY not in spec.metadata:
            return spec
        metadata = {name: _with_prefix(value, prefix) for name, value in spec.metadata.items()}
        if REDIS_KEY in metadata:
            metadata[URI] = redis_uri(settings, str(metadata[REDIS_KEY]))
        return spec.replace_attributes(description=(
            f"{text.replace(PREFIX, prefix).rstrip()}\n\nRedis keys start with `{prefix}`, the "
            f"`REDIS_KEY_PREFIX` this code location loaded with."), metadata=metadata)

    return render
