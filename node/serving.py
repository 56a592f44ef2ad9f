"""The handler's decisions that are neither the frames' nor the mesh's: a pure core.

Two books, in the manner of frames.py and mesh/gather.py: they take `now_s` and values, touch no
socket, and say what changed; node/handler.py carries values between them and its sockets.

EngineWindow   how much work is queued at the engine (about ENGINE_QUEUE_S of its compute, at
               least 2 items), its running mean time per item, and whether it has stalled
               (work pending and no answer for the stall limit).
ServingState   whether this node serves clients: not before its engine is ready, then once it
               hears every peer that answers or a start-up grace has passed (counted again from
               a stall of its own); and the refusal to give clients while every answering peer
               refuses this node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

# Work queued at the engine, in seconds of its compute (see EngineWindow.window).
ENGINE_QUEUE_S = 0.005
MAX_ENGINE_WINDOW = 32
# The running mean of an item's time weighs the newest item by 1/ITEM_MEAN_WEIGHT.
ITEM_MEAN_WEIGHT = 16
# A stalled engine has answered nothing for max(the configured stall, this many of its longest items).
STALL_ITEMS = 20


class EngineWindow:
    """The engine's queue as the handler sees it."""

    def __init__(self, stall_s: float, now_s: float) -> None:
        self.stall_s = stall_s
        self.outstanding = 0            # items sent and not answered
        self.quiet_since_s = now_s      # when the engine last answered (or was last idle and given work)
        self.ready = False              # it said READY
        self.item_s = 0.001             # running mean of its time per item
        self.max_item_s = 0.0
        self.busy_s = 0.0               # its compute time, all items together

    def window(self) -> int:
        """Items kept at the engine: about ENGINE_QUEUE_S of work, at least 2 (one computing, one
        behind it), so that the engine never waits for the handler, yet a frame that becomes
        ready waits behind little older work."""
        return max(2, min(MAX_ENGINE_WINDOW, int(ENGINE_QUEUE_S / max(self.item_s, 1e-5))))

    def room(self) -> int:
        """Items to send now: at most half the window per message, so that the engine always has
        a message behind the one it computes."""
        window = self.window()
        return min(window - self.outstanding, max(1, window // 2))

    def sent(self, items: int, now_s: float) -> None:
        if self.outstanding == 0:
            self.quiet_since_s = now_s   # an idle engine is not stalled: its clock starts now
        self.outstanding += items

    def answered(self, item_seconds: Sequence[float], now_s: float) -> None:
        """The engine answered these work items (each with its compute time)."""
        self.outstanding = max(0, self.outstanding - len(item_seconds))
        self.quiet_since_s = now_s
        for item_s in item_seconds:
            self.busy_s += item_s
            self.item_s += (item_s - self.item_s) / ITEM_MEAN_WEIGHT
            self.max_item_s = max(self.max_item_s, item_s)

    def stalled(self, now_s: float) -> bool:
        """Work is pending and the engine has not answered for its stall limit: a live handler in
        front of a hung engine must not be counted on by the peers."""
        limit = max(self.stall_s, STALL_ITEMS * self.max_item_s)
        return self.outstanding > 0 and now_s - self.quiet_since_s > limit


@dataclass(frozen=True)
class ServingChange:
    """What `ServingState.update` changed, for the handler to log."""

    serving_started: bool = False
    settled: bool = False             # started because every peer was heard (else: the grace ran out)
    unheard: tuple = ()               # peers not heard when the grace ran out
    refusal_changed: bool = False


class ServingState:
    def __init__(self, startup_grace_s: float) -> None:
        self.startup_grace_s = startup_grace_s
        self.serving = False
        self.refusal = ""                        # why every answering peer refuses us, while that holds
        self.ready_since_s: Optional[float] = None   # the engine's first READY
        self.awaiting_since_s = float("-inf")    # when serving stopped to hear the peers again (a stall)

    def engine_ready(self, now_s: float) -> None:
        """The start-up grace counts from here: until the engine is ready the heartbeats tell the
        peers not to count on this node, so no peer could have answered "I hear you, ready"."""
        if self.ready_since_s is None:
            self.ready_since_s = now_s

    def stalled(self, end_s: float) -> None:
        """Back from a stall of this node: its peers went on without it. Serve again only once it
        hears them (or a new grace), also when it was not serving yet."""
        self.serving, self.awaiting_since_s = False, end_s

    def update(self, now_s: float, states: Mapping[str, str], connected: Iterable[str],
               refusals: Mapping[str, str]) -> ServingChange:
        """`states`: each peer's membership state ("alive", "unreachable", "refused", ...);
        `connected`: the peers this node and they hear both ways; `refusals`: why each refusing
        peer refuses."""
        refusing = [p for p, s in states.items() if s == "refused"]
        if refusing and not any(s in ("alive", "unreachable") for s in states.values()):
            why = sorted({refusals.get(p, "") for p in refusing})
            refusal = f"refused by every peer that answers ({', '.join(refusing)}): {'; '.join(why)}"
        else:
            refusal = ""
        refusal_changed = refusal != self.refusal
        self.refusal = refusal
        if self.serving or self.ready_since_s is None:
            # Never before the engine is ready (and has said so): a frame started earlier would
            # reach peers whose latest report from us says "not ready", and they would release us
            # from it as stalled.
            return ServingChange(refusal_changed=refusal_changed)
        connected = set(connected)
        settled = all(p in connected or s == "refused" for p, s in states.items())
        graced = now_s - max(self.ready_since_s, self.awaiting_since_s) >= self.startup_grace_s
        if not (settled or graced):
            return ServingChange(refusal_changed=refusal_changed)
        self.serving = True
        return ServingChange(True, settled, tuple(p for p in states if p not in connected), refusal_changed)
