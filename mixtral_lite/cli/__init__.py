"""Command-line front ends: generate.py, perplexity.py, chat.py, over front_door.py's one-line errors.

Each parses its flags before importing torch (fast --help), builds a plan with runtime.plan.plan_load
and loads through runtime.load; none imports another, nor anything in serve/.
"""
