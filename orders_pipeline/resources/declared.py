"""Dagster resource fields derived from the settings declarations (`orders_pipeline.settings`).

A resource built by `declared_fields(SettingsClass)` has one config field per setting, with
the setting's default and a description that starts with its environment variable; its
`settings()` builds the plain settings object, so every range and rule is checked by the one
declaration. Dagster config knows str/int/bool and optional values only: integers keep no range
in the launchpad (the settings class checks it when the run starts), `SecretStr` and `Literal`
fields are plain strings, and secret fields are left out of `repr()`.
"""

import types
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import dagster as dg
from pydantic import Field, SecretStr, create_model

from orders_pipeline.settings import Declared

S = TypeVar("S", bound=Declared)


def _config_type(annotation: Any) -> Any:
    """The Dagster config type that holds a value of `annotation`."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _config_type(get_args(annotation)[0])
    if origin is Literal or annotation is SecretStr:
        return str
    if origin in (Union, types.UnionType):
        [inner] = [arg for arg in get_args(annotation) if arg is not type(None)]
        return _config_type(inner) | None
    return annotation


def is_secret(declared: type[Declared], name: str) -> bool:
    """True for settings held as `SecretStr` (passwords)."""
    annotation = declared.declarations()[name].annotation
    return annotation is SecretStr or SecretStr in get_args(annotation)


def declared_fields(declared: type[Declared]) -> type[dg.ConfigurableResource]:
    """A ConfigurableResource base class with one field per setting of `declared`."""
    fields: dict[str, Any] = {
        name: (_config_type(info.annotation),
               Field(default=info.default, repr=not is_secret(declared, name),
                     description=f"{declared.env_name(name)}: {info.description}"))
        for name, info in declared.declarations().items()}
    return create_model(f"{declared.__name__}Fields",  # type: ignore[call-overload]
                        __base__=dg.ConfigurableResource, **fields)


def settings_of(resource: dg.ConfigurableResource, declared: type[S]) -> S:
    """The settings a resource's fields hold; ConfigError names the variable that is wrong."""
    return declared.build({name: getattr(resource, name) for name in declared.declarations()})
