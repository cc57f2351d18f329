"""The Tornado application serving the Nano FrontEnd REST API v1 (see api/app.py)."""
