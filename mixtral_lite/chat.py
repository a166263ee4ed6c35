"""`python -m mixtral_lite.chat`: the command lives in mixtral_lite/cli/chat.py."""

from .cli.chat import main

if __name__ == "__main__":
    main()
