"""Blue/green swaps: a new version brought in beside the old one, with its state."""
