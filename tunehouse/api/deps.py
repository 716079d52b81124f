"""Annotated dependencies: they make handler signatures self-documenting and keep the
authentication and session handling in one place."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from tunehouse.api.auth import Caller, authenticate, authenticate_admin
from tunehouse.files import FileService
from tunehouse.models.registry import Registry
from tunehouse.serve.engine import Engine
from tunehouse.store.home import Home


def _home(request: Request) -> Home:
    return request.app.state.home


def _session(request: Request) -> Iterator[Session]:
    with request.app.state.home.db.session() as s:
        yield s


def _files(request: Request) -> FileService:
    return request.app.state.files


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _engine(request: Request) -> Engine:
    return request.app.state.engine()  # created on first use: starting the server loads no model


HomeDep = Annotated[Home, Depends(_home)]
# scope="function": commit before the response is sent, so a client never reads stale state.
SessionDep = Annotated[Session, Depends(_session, scope="function")]
CurrentCaller = Annotated[Caller, Depends(authenticate)]
AdminCaller = Annotated[Caller, Depends(authenticate_admin)]
FilesDep = Annotated[FileService, Depends(_files)]
RegistryDep = Annotated[Registry, Depends(_registry)]
EngineDep = Annotated[Engine, Depends(_engine)]
