"""PostgreSQL for the tests (filled in by the database change)."""


def database_settings(request) -> dict:
    """Settings fields that point a test's home at its own fresh PostgreSQL database."""
    return {}
