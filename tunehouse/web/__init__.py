"""The dashboard: static pages and plain JS modules shipped as package data, served by the API
server at `/`; they read and change everything through the public API (`web/router.py`)."""
