"""The quickstart: ``python -m fasttune.quickstart`` (see __main__.py)."""
