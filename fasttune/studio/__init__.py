"""fasttune studio: a local web app to prepare data, train, watch, chat and export (``fasttune studio``).

A client of the library like the CLI: the recipe schema (``fasttune.cli.recipe``) generates its form and validates
it, the CLI's data steps make its preview, its runs are ``fasttune train`` processes writing ordinary run folders,
and its exports are ``fasttune export``. ``server.py`` holds the HTTP server and its safety rules, ``api.py`` the
answers, ``preview.py`` the data page, ``runs.py`` the run folders, ``chat.py`` the chat page, ``static/`` the page.
"""

from __future__ import annotations

from .server import Studio, make_server

__all__ = ["Studio", "make_server"]
