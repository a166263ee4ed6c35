"""mixtral-lite: Mixtral and Mistral with experts offloaded to host memory."""

from pathlib import Path


def default_model_path() -> Path:
    """The small Austen-trained Mixtral shipped inside the package."""
    return Path(__file__).parent / "models" / "austen-mixtral"
