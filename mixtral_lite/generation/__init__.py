"""Generation: a model's logits into tokens and text.

sampling.py (pure functions of logits, seeded), decode.py (generate / generate_stream: chunked prefill,
then one token at a time, NaN/Inf checked), session.py (one model serving a stream of requests:
left-padded batches, KV prefix reuse across turns, stop strings from stops.py, cancellation).
"""
