"""tunepool execution plane: Celery workers and the training library."""
