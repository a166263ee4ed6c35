"""`python -m mixtral_lite.generate`: the command lives in mixtral_lite/cli/generate.py."""

from .cli.generate import main

if __name__ == "__main__":
    main()
