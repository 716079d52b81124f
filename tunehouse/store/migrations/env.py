"""Alembic environment. tunehouse runs it in code (`tunehouse.store.migrate`): the caller hands
over a connection already inside the transaction that holds the migration lock, so there is no
alembic.ini and no engine made here."""

from alembic import context

from tunehouse.store.tables import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():  # a no-op inside the caller's transaction
    context.run_migrations()
