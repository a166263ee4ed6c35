"""`python -m mixtral_lite.server`: the command lives in mixtral_lite/serve/server.py."""

from .serve.server import main

if __name__ == "__main__":
    main()
