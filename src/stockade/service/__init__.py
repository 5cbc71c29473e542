"""``stockade serve``: the :class:`~stockade.backend.SandboxBackend` contract as JSON over HTTP.

The pieces, each importable without the web stack except where noted:

- :mod:`.app` builds the ASGI application (Starlette; ``pip install 'stockade[service]'``).
- :mod:`.server` binds a unix socket (0600, the default) or TCP (bearer token mandatory) and runs uvicorn.
- :mod:`.auth` keeps the bearer token file (generated on first start, 0600, rotatable).
- :mod:`.files` moves files into and out of a session through the session itself, so that every path is
  resolved inside the sandbox's own view.
- :mod:`.wire` holds the HTTP-only values: error statuses, limits, stream frames.
- :mod:`.openapi` describes it all (served at ``/openapi.json``, committed as ``docs/openapi.json``).

See ``docs/service.md`` for the API.
"""

from .paths import default_service_dir, default_socket_path, default_token_path
from .wire import ServiceLimits, status_for

__all__ = ["ServiceLimits", "default_service_dir", "default_socket_path", "default_token_path", "status_for"]
