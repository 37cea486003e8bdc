"""conceptguard guard: safe textual-inversion loading and request screening (not built yet)."""
