"""conceptguard serving: the command line today; the Ray Serve application and HTTP API next."""
