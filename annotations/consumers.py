"""Websocket consumer: one group per project; round progress and queue refreshes are pushed here."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from .permissions import membership_role


def project_group(project_id: int) -> str:
    return f"project-{project_id}"


class ProjectConsumer(AsyncJsonWebsocketConsumer):
    """Members of a project receive its events; anyone else is refused at the handshake."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        self.project_id = int(self.scope["url_route"]["kwargs"]["project_id"])
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        role = await database_sync_to_async(membership_role)(user, self.project_id)
        if role is None:
            await self.close(code=4403)
            return
        self.group = project_group(self.project_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json({"type": "hello", "project": self.project_id, "role": role})

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def project_event(self, event: dict[str, Any]) -> None:
        """Relay an event sent with ``group_send(group, {"type": "project.event", "payload": {...}})``."""
        await self.send_json(event["payload"])
