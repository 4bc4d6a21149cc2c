"""Follow each disk through every layer and say which one blocks discard."""
