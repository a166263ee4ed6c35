"""serve room (see mixtral_lite/__init__.py)."""
