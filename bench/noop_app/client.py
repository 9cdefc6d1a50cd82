"""The no-op ClientApp: answers ``query.noop`` with an empty reply. Imports Flower only."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

client_app = ClientApp()


@client_app.query("noop")
def noop(message: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=message)
