"""An S3 server for the tests (filled in by the blob-store change)."""


def blob_settings(request) -> dict:
    """Settings fields that point a test's home at its own fresh S3 bucket."""
    return {}
