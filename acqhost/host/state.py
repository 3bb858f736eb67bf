"""What the host knows between messages: the store, its keys and configuration, and short-lived
caches of terminals, session keys, settlement accounts and open batches.

Stages read the host through a :class:`HostState` and nothing else: it is all a stage may
touch besides its own message's :class:`~acqhost.host.context.Context`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from acqhost.config import Config
from acqhost.domain import accounts, crypto
from acqhost.domain.crypto import HostKeys, SessionKeys
from acqhost.errors import Decline
from acqhost.store.base import AccountVersion, Store, Terminal
from acqhost.wire.tlv import encode_tlv

__all__ = ("CACHE_SECONDS", "PEER_READS_PER_SECOND", "HostState", "ReadBudget")

# How long cached terminals and accounts are trusted before the store is asked again, so a
# change made by the CLI reaches a running host within this many seconds. A cached account is
# also never trusted past the next effective-from the store knows of; with every decision
# taking effect acqhost.domain.accounts.DECISION_LEAD (> CACHE_SECONDS) after it is made, all
# host processes switch to a new account at its effective-from exactly.
CACHE_SECONDS = 1.0
assert CACHE_SECONDS < accounts.DECISION_LEAD

# Store reads anyone can cause without proving anything: a terminal id this process does not
# know of (not registered when it started, nor found since), and a MAC that fails on cached
# session keys (reloaded in case another host process took a newer sign-on). At most this
# many a second per host process, in bursts as large; beyond it such a frame is answered from
# what is cached (03 for the unknown id, 63 for the MAC) without asking the store, so a flood
# of forged frames costs reads at this rate, not at its own (SECURITY.md).
PEER_READS_PER_SECOND = 1000.0


class ReadBudget:
    """A token bucket: :meth:`take` says whether one more read fits the rate."""

    __slots__ = ("_last", "_rate", "_tokens")

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._tokens = rate
        self._last: float | None = None

    def take(self, now: float) -> bool:
        last = self._last
        if last is not None and now > last:  # a clock set back adds nothing
            self._tokens = min(self._rate, self._tokens + (now - last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class HostState:
    """The store (read through caches), the host keys, the configuration and the clock.

    Lives in the event loop's thread: the caches are not locked.
    """

    def __init__(
        self,
        *,
        store: Store,
        host_keys: HostKeys,
        config: Config,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.host_keys = host_keys
        self.config = config
        self.clock = clock
        self.terminals: dict[str, tuple[float, Terminal | None]] = {}  # (read at, terminal)
        # The terminal ids known to be registered (at start, and found since): a lookup of
        # any other id takes a read from ``peer_reads``.
        self.registered: set[str] = {t.tid for t in store.list_terminals()}
        self.peer_reads = ReadBudget(PEER_READS_PER_SECOND)
        self.sessions: dict[str, tuple[float, SessionKeys, bytes]] = {}  # (read at, keys, rx)
        self.accounts: dict[str, tuple[float, AccountVersion | None]] = {}  # (expires, ...)
        self.batches: dict[str, int] = {}
        self._account_tlv: dict[tuple[str, int], str] = {}
        # Submits (41, 11, 7) this process refused lately, with the answer they got: a
        # retransmission gets the same answer instead of counting a wrong password twice.
        self.rebind_refusals: OrderedDict[tuple[str, str, str], Decline] = OrderedDict()
        # Called when a write of this process has queued advices for the banks (the runtime
        # wakes its bank links with it; they also look by themselves, for other processes').
        self.advices_queued: Callable[[], None] = lambda: None
        # The host core's codec (it sets it), for the rare stage that must re-encode a request.
        self.encode: Callable[[dict[str, str]], bytes] | None = None

    def terminal(self, tid: str) -> Terminal | None:
        now = self.clock()
        hit = self.terminals.get(tid)
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        known = tid in self.registered
        if not known and not self.peer_reads.take(now):
            return None  # unknown to this process, and over the rate: not looked up
        terminal = self.store.get_terminal(tid)
        if terminal is None:
            self.registered.discard(tid)  # deleted, or never was
        elif not known:
            self.registered.add(tid)  # registered since this process started
        self.terminals[tid] = (now, terminal)
        if len(self.terminals) > 100_000:
            self.terminals.clear()
        return terminal

    def session_keys(self, tid: str, *, reload: bool = False) -> SessionKeys | None:
        """The terminal's session keys. Cached for CACHE_SECONDS: a sign-off or a new sign-on
        through another host process sharing the store reaches this one within that time
        (and a MAC that fails on cached keys reloads them at once)."""
        now = self.clock()
        if not reload:
            hit = self.sessions.get(tid)
            if hit is not None and now - hit[0] < CACHE_SECONDS:
                return hit[1]
        session = self.store.get_session(tid)
        if session is None:
            self.sessions.pop(tid, None)
            return None
        hit = self.sessions.get(tid)
        if hit is not None and hit[2] == session.sealed_rx:  # the same sign-on: keep its keys
            self.sessions[tid] = (now, hit[1], hit[2])
            return hit[1]
        data_key = self.host_keys.data_key
        keys = SessionKeys.from_kx(
            crypto.unseal(data_key, session.sealed_rx), crypto.unseal(data_key, session.sealed_tx)
        )
        self.sessions[tid] = (now, keys, session.sealed_rx)
        return keys

    def account(self, tid: str, now: float) -> AccountVersion | None:
        """The version in force at ``now``, cached until CACHE_SECONDS pass or the next
        effective-from comes, whichever is first."""
        hit = self.accounts.get(tid)
        if hit is not None and now < hit[0]:
            return hit[1]
        with self.store.transaction(write=False) as tx:
            versions = tx.versions(tid)
        account = accounts.in_force(versions, now)
        expires = now + CACHE_SECONDS
        change = accounts.next_change(versions, now)
        if change is not None and change < expires:
            expires = change
        self.accounts[tid] = (expires, account)
        return account

    def account_tlv(self, account: AccountVersion) -> str:
        """48 {SA, SV, BK} naming the account a sale settles to (the same text every time)."""
        key = (account.tid, account.version)
        text = self._account_tlv.get(key)
        if text is None:
            text = encode_tlv(
                {"SA": account.account_masked, "SV": str(account.version), "BK": account.bank_code}
            )
            self._account_tlv[key] = text
        return text

    def batch(self, tid: str) -> int:
        number = self.batches.get(tid)
        if number is None:
            number = self.batches[tid] = self.store.open_batch(tid)
        return number

    def sale_seen(self, tid: str, stan: str, local_date: str) -> bool:
        return self.store.sale_exists(tid, stan, local_date)

    def invalidate(self, kind: str, tid: str) -> None:
        """Forget what is cached of terminal ``tid`` because it changed in the store: ``kind``
        "terminal", "session" or "account" drops that entry, any other kind every entry of the
        terminal, and "*" (notifications may have been missed) every cache."""
        # The store's own word (a notification from a write): a terminal it names is
        # registered, or is looked up without the peers' read budget and found not to be.
        if kind == "*":
            self.registered = {t.tid for t in self.store.list_terminals()}
            self.terminals.clear()
            self.sessions.clear()
            self.accounts.clear()
            self.batches.clear()
        elif kind == "terminal":
            self.registered.add(tid)
            self.terminals.pop(tid, None)
        elif kind == "session":
            self.sessions.pop(tid, None)
        elif kind == "account":
            self.accounts.pop(tid, None)
        else:
            self.registered.add(tid)
            self.terminals.pop(tid, None)
            self.sessions.pop(tid, None)
            self.accounts.pop(tid, None)
            self.batches.pop(tid, None)
