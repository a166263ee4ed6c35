"""`python -m mixtral_lite.perplexity`: the command lives in mixtral_lite/cli/perplexity.py."""

from .cli.perplexity import main

if __name__ == "__main__":
    main()
