"""ECAvg: edge-cloud collaborative learning with averaged weights.

Public API: ``average_state_dicts`` (weighted average of plain PyTorch state dicts) and ``run_experiment``
(one experiment from a config dict to an output directory, as ``ecavg run`` does).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import ecavg` (and `ecavg --version`) does not pay for importing torch.
    if name == "average_state_dicts":
        from ecavg.core.averaging import average_state_dicts

        return average_state_dicts
    if name == "run_experiment":
        from ecavg.experiment import run_experiment

        return run_experiment
    raise AttributeError(f"module 'ecavg' has no attribute {name!r}")


__all__ = ["average_state_dicts", "run_experiment", "__version__"]
