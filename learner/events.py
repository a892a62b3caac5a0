"""Pushing round progress and queue refreshes to a project's websocket group."""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from annotations.consumers import project_group

logger = logging.getLogger(__name__)


def broadcast(project_id: int, payload: dict[str, Any]) -> None:
    """Best effort: a broker hiccup must never fail a training round."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(project_group(project_id), {"type": "project.event", "payload": payload})
    except Exception:
        logger.warning("Could not broadcast %s to project %s", payload.get("type"), project_id, exc_info=True)


def round_payload(round_: Any, kind: str = "round.progress") -> dict[str, Any]:
    return {
        "type": kind,
        "round": round_.pk,
        "number": round_.number,
        "state": round_.state,
        "stage": round_.stage,
        "progress": round(round_.progress, 1),
        "error": round_.error,
    }
