"""blktx's built-in plugins. Each module is an ordinary plugin, listed under the
``blktx`` entry-point group in pyproject.toml like a third-party one, and uses only
blktx's public API."""
