"""Built-in model services (registered in pyproject.toml under `ml_service.services`)."""
