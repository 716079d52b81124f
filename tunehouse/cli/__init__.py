"""The `tunehouse` command: serve, worker, keys, models, db, files, fine-tuning (alias ft),
quickstart, chat, eval. Thin over the client and services; `fine-tuning create` takes the
together CLI's flags.

    common.py       consoles, shared options, client, error and table printing
    local.py        serve, worker, keys, models (the local home)
    files.py        files check / upload / list / retrieve / content / delete
    fine_tuning.py  fine-tuning create / list / retrieve / events / checkpoints / metrics / … / watch
    chat.py         quickstart, chat, eval
    db.py           db upgrade / current (the schema)
"""

from __future__ import annotations

import typer

from tunehouse.cli import chat, local
from tunehouse.cli.db import db_app
from tunehouse.cli.files import files_app
from tunehouse.cli.fine_tuning import ft_app

app = typer.Typer(help="tunehouse: self-hosted fine-tuning for open LLMs (Together-compatible API).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.command()(local.serve)
app.command()(local.worker)
app.command()(chat.quickstart)
app.command()(chat.chat)
app.command("eval")(chat.eval_models)
app.add_typer(local.keys_app, name="keys")
app.add_typer(local.models_app, name="models")
app.add_typer(db_app, name="db")
app.add_typer(files_app, name="files")
app.add_typer(ft_app, name="fine-tuning")
app.add_typer(ft_app, name="ft", help="Alias of fine-tuning.")

__all__ = ["app"]
