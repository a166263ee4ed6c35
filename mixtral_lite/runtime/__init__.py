"""The runtime: the one place that turns flags into a loaded model, and reports on the run.

flags.py (every shared flag, torch-free) -> plan.py (LoadPlan, built once by plan_load and checked)
-> load.py (load / open_session / load_model) -> offloading.py (the experts factory: host store,
codec, K slots, policies -> offload/'s OffloadEngine). sizing.py is the one planner (sizes and placement)
a run and --dry-run share; device.py picks device, dtype and threads; budget.py sizes K from a device
budget; dry_run.py prints a plan's figures; checks.py holds the model checks the front ends share and
errors.py their one-line error handler; runstats.py and tracing.py are the figures and routing trace a
run writes.
"""
