"""Runtime backends: everything that talks to an engine lives here and nowhere else."""
