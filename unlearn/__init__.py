"""conceptguard unlearning methods, weight patches and their cache (not built yet)."""
