"""What every experiment shares: config -> flags, data splits, the run folder, and tasks.

    cli       frozen config dataclasses as command-line flags (``--quick`` presets)
    settings  the shared settings groups (data, privacy, run)
    splits    private / validation / public / test partitions of a dataset
    runs      the run folder: released files, non-DP diagnostics, the privacy ledger
    tasks     train a model privately or not, classifiers, train-on-synthetic, FID/IS

An experiment script builds its config, calls these and prints its table; see
``experiments/dp_classifier.py``.
"""

from jaxdp.experiment import cli, runs, settings, splits, tasks

__all__ = ["cli", "runs", "settings", "splits", "tasks"]
