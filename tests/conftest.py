"""Test configuration shared by the suite."""

# The conformance table's modules are imported through optim_db, not collected: collecting
# infos_*.py for doctests would import them first and re-enter optim_db in a cycle.
collect_ignore_glob = ["infos_*.py", "optim_db.py"]
