"""The engine side: driver, phase runner, engines, placement and plan, run directory, metrics."""
