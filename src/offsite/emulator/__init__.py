"""The emulator: which middle layers stand in for the full middle block, compressed and distilled, and back."""
