"""Training and evaluation data: types, readers, tokenisation and the built-in datasets."""
