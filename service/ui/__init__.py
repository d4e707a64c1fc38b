"""The web dashboard's templates and static files (served by service/api/ui.py)."""
