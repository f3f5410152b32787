"""transformers test files of the installed release (see README.md); not collected on their own."""
