"""Training the adapter (or any chosen blocks) through frozen ones: trainer, losses and memory savers."""
