"""`python -m mixtral_lite.server`: the command lives in mixtral_lite/serve/server.py."""

import sys

SERVER_PACKAGES = ("fastapi", "uvicorn", "prometheus_client", "pydantic", "starlette")


def main(argv: list[str] | None = None) -> None:
    """The server's main; without the `server` extra, one line that names it."""
    try:
        from .serve.server import main as serve
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in SERVER_PACKAGES:
            raise
        print(f"error: the server needs the '{e.name}' package: pip install 'mixtral-lite[server]'", file=sys.stderr)
        raise SystemExit(2) from None
    serve(argv)


if __name__ == "__main__":
    main()
