"""`tunepool files|jobs|models ...`: the REST API from a terminal, for users (not admins).

The server and key come from TUNEPOOL_API_URL / TUNEPOOL_API_KEY, else from `api_url` / `api_key`
in ~/.config/tunepool/config.toml (or config.json; $XDG_CONFIG_HOME is honoured). Read commands
print tables, or the API's JSON with --json. An API error prints `error: <message>` to stderr and
exits 1; so does a server that cannot be reached (naming the URL). Missing settings exit 2.
"""

from service.usercli import files, follow, jobs  # noqa: F401 - importing registers the commands
from service.usercli.common import files_app, jobs_app, models_app

__all__ = ["files_app", "jobs_app", "models_app"]
