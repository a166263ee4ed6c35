"""mixtral-lite: Mixtral and Mistral with experts offloaded to host memory.

Four rooms over offload/; imports only point down the list (tests/test_import_graph.py checks it):

    cli/, serve/   front ends: generate, perplexity, chat (cli/); the OpenAI server (serve/)
    runtime/       flags -> LoadPlan -> loaded model: device, budget, offloading factory, run figures
    generation/    logits -> text: sampling, the generation loop, Session (batching, KV reuse, stops)
    model/         a checkpoint -> logits: config, readers, the Transformer, its experts seam, KV cache
    offload/       (beside this package) experts stored, cached, moved and run; knows nothing of Mixtral

`python -m mixtral_lite.generate` (.perplexity, .chat, .server) are shims that call the front end's main.
"""

from pathlib import Path


def default_model_path() -> Path:
    """The small Austen-trained Mixtral shipped inside the package."""
    return Path(__file__).parent / "models" / "austen-mixtral"
