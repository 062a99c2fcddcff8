"""Issue 9 item 2: each setting is declared once, and everything else is derived from it.

The declarations in `orders_pipeline.settings` fix each variable's name, default, description
and range; `.env.example`, the Dagster resources, `resources_from_env`, the subprocess
environments of the tests (`Settings.to_env`) and the CLI ranges must follow them.
"""

import dataclasses
from pathlib import Path

import dagster as dg
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr

from orders_pipeline.resources import RESOURCES, resources_for, resources_from_env
from orders_pipeline.settings import (
    SETTINGS_CLASSES,
    SSL_MODES,
    ConfigError,
    Declared,
    PipelineSettings,
    PostgresSettings,
    RedisSettings,
    Settings,
)

ENV_EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"


def env_example_entries() -> list[tuple[str, str, str]]:
    """(variable, value, the comment just above it joined into one line), in file order."""
    entries: list[tuple[str, str, str]] = []
    comment: list[str] = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith("#"):
            comment.append(line.lstrip("# "))
        elif "=" in line:
            name, value = line.split("=", 1)
            entries.append((name, value, " ".join(comment)))
            comment = []
        else:
            comment = []
    return entries


def declared_entries() -> list[tuple[str, str, str]]:
    entries = []
    for cls in SETTINGS_CLASSES:
        defaults = cls().to_env()
        for name, info in cls.declarations().items():
            entries.append((cls.env_name(name), defaults[cls.env_name(name)],
                            str(info.description)))
    return entries


def test_env_example_lists_exactly_the_declared_settings() -> None:
    """Same variables, same order, each with its default and its description as comment."""
    listed, declared = env_example_entries(), declared_entries()
    assert [e[0] for e in listed] == [e[0] for e in declared]
    assert listed == declared
    assert len({name for name, _, _ in declared}) == len(declared) == 31


def test_resources_have_one_field_per_setting_described_by_its_variable() -> None:
    for key, (resource, declared) in RESOURCES.items():
        fields = resource.model_fields
        assert list(fields) == list(declared.declarations()), key
        for name, info in declared.declarations().items():
            assert fields[name].default == info.default
            assert fields[name].description == f"{declared.env_name(name)}: {info.description}"


def test_set_variables_become_env_vars_and_resolve_to_the_same_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"REDIS_PORT": "6390", "REDIS_PASSWORD": "s3cret", "POSTGRES_DB": "shop",
           "USE_PGBOUNCER": "yes", "BATCH_SIZE": "250", "CLAIM_TIMEOUT_SECONDS": "7"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    resources = resources_from_env()
    assert resources["redis"].port == dg.EnvVar.int("REDIS_PORT")
    assert resources["redis"].password == dg.EnvVar("REDIS_PASSWORD")
    assert resources["pipeline"].batch_size == dg.EnvVar.int("BATCH_SIZE")
    assert resources["postgres"].use_pgbouncer is True  # booleans have no EnvVar form
    with dg.build_resources(resources) as built:
        resolved = Settings(redis=built.redis.settings(), postgres=built.postgres.settings(),
                            pipeline=built.pipeline.settings())
    assert resolved == Settings.from_env()
    assert (resolved.redis.port, resolved.postgres.dbname, resolved.pipeline.batch_size) == (
        6390, "shop", 250)


def test_an_out_of_range_resource_value_is_refused_by_the_declaration() -> None:
    resource = resources_for(Settings())["pipeline"]
    bad = type(resource)(**{**resource.model_dump(), "batch_size": 0})
    with pytest.raises(ConfigError, match="^BATCH_SIZE must be an integer from 1 to 100000, "
                                          "got 0$"):
        bad.settings()


def test_cross_field_rule_is_one_line() -> None:
    with pytest.raises(ConfigError, match="^REDIS_SSL_CA_CERTS is set but REDIS_SSL is false$"):
        Settings.from_env({"REDIS_SSL_CA_CERTS": str(ENV_EXAMPLE)})
    with pytest.raises(ConfigError, match="^POSTGRES_SSLMODE must be one of disable, "):
        Settings.from_env({"POSTGRES_SSLMODE": "always"})
    with pytest.raises(ConfigError, match="^USE_PGBOUNCER must be true or false, got 'maybe'$"):
        Settings.from_env({"USE_PGBOUNCER": "maybe"})


def _valid(cls: type[Declared]) -> st.SearchStrategy[Declared]:
    """Any instance of `cls` whose values are in range (files left unset)."""
    fields: dict[str, st.SearchStrategy[object]] = {}
    text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                   min_size=1, max_size=20).filter(lambda s: s.strip() == s)
    for name, info in cls.declarations().items():
        if name in ("ssl_ca_certs", "sslrootcert", "cluster", "sentinel_hosts"):
            continue
        default = info.default
        if isinstance(default, bool):
            fields[name] = st.booleans()
        elif isinstance(default, int):
            bound = cls.bound(name)
            fields[name] = st.integers(bound.minimum, bound.maximum)
        elif name == "sslmode":
            fields[name] = st.sampled_from(SSL_MODES)
        elif name == "password":
            fields[name] = st.none() | text.map(SecretStr)
        else:
            fields[name] = (st.none() | text) if default is None else text
    return st.builds(cls, **fields)


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.builds(Settings, redis=_valid(RedisSettings), postgres=_valid(PostgresSettings),
                 pipeline=_valid(PipelineSettings)))
def test_generated_settings_survive_env_and_resources(settings: Settings) -> None:
    """What a test or the CLI hands a subprocess (`to_env`) and what Dagster resources hold
    (`resources_for`) both read back as exactly the same settings."""
    assert Settings.from_env(settings.to_env()) == settings
    resources = resources_for(settings)
    assert resources["redis"].settings() == settings.redis
    assert resources["postgres"].settings() == settings.postgres
    assert resources["pipeline"].settings() == settings.pipeline
    assert dataclasses.replace(settings.pipeline) == settings.pipeline
