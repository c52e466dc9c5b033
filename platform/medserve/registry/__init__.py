"""The model registry: models, their versions and what is deployed."""
