"""The user's model.py: loading it by path, checking it against the contract, calling the model."""
