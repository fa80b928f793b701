"""Several Ollama hosts behind one ollamon: configuration, health, model-aware routing, retries, unions.

A self-contained layer the forwarder calls (docs/upstreams.md): ``HostPool.acquire(model)`` picks a host,
``release(host, outcome)`` returns it, ``send_with_retry`` applies the retry rule, ``HostPool.union`` answers
``/api/tags`` and ``/api/ps`` for all hosts. It imports nothing of the forwarder, the API or the wiring.
"""

from proxy.upstreams.errors import NoUpstreamError, UpstreamsConfigError, UpstreamsError
from proxy.upstreams.fanout import HostAnswer, combined, fan_out, final_line
from proxy.upstreams.host import Host, Outcome
from proxy.upstreams.management import is_management, management_targets
from proxy.upstreams.pool import UNION_PATHS, HostPool
from proxy.upstreams.retry import (
    RETRY_STATUSES,
    FailedBeforeFirstByte,
    may_retry,
    outcome_for_status,
    send_with_retry,
)
from proxy.upstreams.settings import ALL_HOSTS, HostSpec, PoolSettings, parse_hosts, parse_management
from proxy.upstreams.unions import (
    AnswerError,
    encode_go_json,
    merge_openai_models,
    merge_ps,
    merge_tags,
    parse_models,
)

__all__ = [
    "ALL_HOSTS",
    "RETRY_STATUSES",
    "UNION_PATHS",
    "AnswerError",
    "FailedBeforeFirstByte",
    "Host",
    "HostAnswer",
    "HostPool",
    "HostSpec",
    "NoUpstreamError",
    "Outcome",
    "PoolSettings",
    "UpstreamsConfigError",
    "UpstreamsError",
    "combined",
    "encode_go_json",
    "fan_out",
    "final_line",
    "is_management",
    "management_targets",
    "may_retry",
    "merge_openai_models",
    "merge_ps",
    "merge_tags",
    "outcome_for_status",
    "parse_hosts",
    "parse_management",
    "parse_models",
    "send_with_retry",
]
