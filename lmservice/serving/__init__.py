"""Between the API and the engine: the names a server answers to and the adapters behind them
(`models`, `adapters`), and building everything from Settings (`bootstrap`).

Nothing here knows HTTP; the engine knows nothing of this package or of Settings.
"""
