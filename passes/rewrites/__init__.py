"""The passes, one per file; importing a module registers its pass."""
