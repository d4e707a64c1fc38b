"""The training library: runs standalone (`python -m worker.training CONFIG`), imports nothing of
the service. Kept import-light: `formats` must load without torch (the API validates uploads with it).
"""
