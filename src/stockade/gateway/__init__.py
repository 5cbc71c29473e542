"""The egress gateway: the only way out of a sandbox with a limited network policy (design.md section 4).

Pure pieces (``addresses``, ``policy``, ``sni``, ``dns``, ``audit``, ``resolver``) and the asyncio server
(``server.Gateway``) that the backends run, usually as its own process (``python -m stockade.gateway``, see
``process``).
"""

from stockade.gateway.addresses import classify
from stockade.gateway.audit import AuditLog, read
from stockade.gateway.dns import FakeAddressMap
from stockade.gateway.policy import Decision, GatewayPolicy
from stockade.gateway.process import GatewayConfig, control, control_sync
from stockade.gateway.resolver import (
    RecordingResolver,
    ResolveError,
    Resolver,
    StaticResolver,
    SystemResolver,
)
from stockade.gateway.server import Gateway

__all__ = [
    "AuditLog",
    "Decision",
    "FakeAddressMap",
    "Gateway",
    "GatewayConfig",
    "GatewayPolicy",
    "RecordingResolver",
    "ResolveError",
    "Resolver",
    "StaticResolver",
    "SystemResolver",
    "classify",
    "control",
    "control_sync",
    "read",
]
