"""Test a backfill the way it will run: a pytest plugin shipped with the package (entry point `pytest11`).

`pytest_plugin` holds the fixtures, `harness` the work behind `exactly_once`, `faults` the plugin it
loads into a `migrate` subprocess to kill it at a phase of the batch protocol. Nothing here is
imported by the rest of the package.
"""
