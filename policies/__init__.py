"""conceptguard policy schema and loader (not built yet)."""
