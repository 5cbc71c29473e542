"""Host side of the agent protocol (see ``_agent.py``): the shared framed client, with the agent as peer."""

from .._framed import PeerGone as AgentGone
from .._framed import PeerReply as AgentReply
from .._framed import request_frames, send_request, short_unix_path

__all__ = ["AgentGone", "AgentReply", "request_frames", "send_request", "short_unix_path"]
