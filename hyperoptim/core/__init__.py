"""The layer every optimizer shares: the base class and its step pipeline, argument checks,
distributed helpers and type aliases. Nothing here imports a method or a rule."""
