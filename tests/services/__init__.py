"""Real servers the store tests run against (PostgreSQL, an S3 server), started once per test
session and stopped after; each test gets its own database and bucket."""
