"""Sale and test sale, 0200 -> 0210 (PROTOCOL.md 5.1): stand-in authorisation by the host."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from acqhost.domain import accounts, cards
from acqhost.errors import Decline
from acqhost.host.context import Context, Effect
from acqhost.host.state import HostState
from acqhost.log import get_logger
from acqhost.store.base import SaleRecord, SaleResult, Store, StoreTx, Terminal

__all__ = ("SALE_ECHO", "SALE_FIELDS", "approved", "authorise", "card")

log = get_logger("acqhost.message")

# Auth codes are not secrets (they travel in the clear); a seeded PRNG is enough and cheap.
_random = random.Random()

SALE_FIELDS = ("3", "4", "7", "11", "12", "13", "22", "41", "42", "49")
SALE_ECHO = ("3", "4", "7", "11", "12", "13", "41", "42", "49")


def card(state: HostState, ctx: Context) -> None:
    """The card comes as track 2 (35) or as PAN (2) + expiry (14): 30 when neither is whole."""
    req = ctx.req
    track2 = req.get("35")
    if track2 is not None:
        ctx.card = cards.track2_card(track2)  # digits checked there
        return
    if "2" not in req or "14" not in req:
        raise Decline("30", "MISSING_CARD")
    pan, expiry = req["2"], req["14"]
    if not (pan.isdigit() and pan.isascii() and expiry.isdigit() and expiry.isascii()):
        raise Decline("30", "FORMAT_CARD")
    ctx.card = (pan, expiry)


def _business_checks(ctx: Context, terminal: Terminal) -> tuple[int, bool]:
    """PROTOCOL.md 5.1's checks in its order: (amount, test sale) when they all pass."""
    assert ctx.card is not None
    pan, expiry = ctx.card
    if not 12 <= len(pan) <= 19 or not cards.luhn_ok(pan):
        raise Decline("14", "BAD_PAN")
    if card_expired(expiry, ctx.now):
        raise Decline("54", "EXPIRED")
    amount = int(ctx.req["4"])
    if amount <= 0:
        raise Decline("13", "ZERO_AMOUNT")
    if amount > terminal.sale_limit:
        raise Decline("61", "OVER_LIMIT")
    test = ctx.tlv.get("TS") == "1"
    if test and amount > terminal.test_limit:
        raise Decline("13", "OVER_TEST_LIMIT")
    return amount, test


def authorise(state: HostState, ctx: Context) -> None:
    """The business checks, then the approval to be made durable.

    A duplicate (41, 11, 13) is answered 94 before any business check, as PROTOCOL.md orders,
    without asking the ledger on the way to an approval: there the insert itself refuses the
    duplicate (94). Only a request about to be declined is looked up, so that a retransmitted
    approval is never answered with a decline.
    """
    req, terminal = ctx.req, ctx.terminal
    assert terminal is not None
    assert ctx.card is not None
    pan = ctx.card[0]
    try:
        amount, test = _business_checks(ctx, terminal)
    except Decline:
        if state.sale_seen(req["41"], req["11"], req["13"]):
            raise Decline("94", "DUPLICATE") from None
        raise
    account = state.account(terminal.tid, ctx.now)
    if account is None:  # every terminal is registered with version 1: our fault
        raise RuntimeError(f"terminal {terminal.tid} has no settlement account in force")
    ctx.account = account
    # random() * 10**6 is uniform over the codes to within 2**-33, at a quarter of the cost
    # of randrange.
    auth_code = f"{int(_random.random() * 1_000_000):06d}"
    # Positional: fourteen keyword arguments cost ~0.8 us more a sale (fields in the order
    # of SaleRecord: tid, mid, stan, local_date, local_time, transmission, amount, currency,
    # pan_masked, auth_code, test, account_version, batch_no, received_at).
    sale = SaleRecord(
        terminal.tid,
        terminal.mid,
        req["11"],
        req["13"],
        req["12"],
        req["7"],
        amount,
        req["49"],
        cards.mask_pan(pan),
        auth_code,
        test,
        account.version,
        state.batch(terminal.tid),
        ctx.now,
    )
    if test and account.state != "VERIFIED":
        # The test sale that proves a new account: recorded with the version's VERIFIED in
        # one transaction, so whoever reads the account after the 0210 reads VERIFIED.
        ctx.effect = Effect(
            sale, _record_and_verify(sale, state.host_keys.data_key), then=_approved_verifying
        )
    else:
        ctx.effect = Effect(sale, then=approved)
    ctx.log["amount"] = amount
    if test:
        ctx.log["test"] = True


def approved(state: HostState, ctx: Context, result: SaleResult) -> None:
    """The 0210 of a recorded sale: its RRN, auth code and the account it settles to; 94 when
    the ledger already had (41, 11, 13)."""
    if result.duplicate:
        raise Decline("94", "DUPLICATE")
    effect, account = ctx.effect, ctx.account
    assert effect is not None and effect.sale is not None and account is not None
    resp = ctx.resp
    resp["37"] = result.rrn
    resp["38"] = effect.sale.auth_code
    resp["48"] = state.account_tlv(account)


def _record_and_verify(sale: SaleRecord, key: bytes) -> Callable[[Store], tuple[SaleResult, bool]]:
    """The ledger's work for a test sale on a version not yet VERIFIED: the sale, and the
    version VERIFIED, in one transaction (the sale's result, and whether this verified it)."""

    def call(store: Store) -> tuple[SaleResult, bool]:
        verified = False

        def verify(tx: StoreTx, results: list[SaleResult]) -> None:
            nonlocal verified  # run again with the transaction, should the store retry it
            verified = not results[0].duplicate and accounts.verify(
                tx, key, sale.tid, sale.account_version, sale.received_at
            )

        (result,) = store.record_sales((sale,), then=verify)
        return result, verified

    return call


def _approved_verifying(state: HostState, ctx: Context, outcome: tuple[SaleResult, bool]) -> None:
    result, verified = outcome
    if verified:
        sale = ctx.effect.sale if ctx.effect is not None else None
        assert sale is not None
        state.accounts.pop(sale.tid, None)
        log.info("account verified", tid=sale.tid, version=sale.account_version)
    approved(state, ctx, result)


# (UTC day number, year * 12 + month of that day): gmtime once a day, not once a sale.
_this_month: list[tuple[int, int]] = [(0, 0)]
# The answers of card_expired for the UTC day _expiry_day[0] (a day never spans two months).
_expiry_day: list[int] = [-1]
_expiry: dict[str, bool] = {}


def card_expired(yymm: str, now: float) -> bool:
    """Is the card expiring in YYMM (20YY) past at ``now``? It is valid through its month."""
    day = int(now // 86400)
    if day == _expiry_day[0]:
        hit = _expiry.get(yymm)
        if hit is not None:
            return hit
    else:
        _expiry.clear()
        _expiry_day[0] = day
    expired = card_expired_uncached(yymm, now)
    if len(_expiry) < 10_000:  # YYMM is four digits (card() checks): at most 10,000 keys
        _expiry[yymm] = expired
    return expired


def card_expired_uncached(yymm: str, now: float) -> bool:
    month = int(yymm[2:])
    if not 1 <= month <= 12:
        return True
    day = int(now // 86400)  # a UTC day never spans two months
    cached_day, this_month = _this_month[0]
    if day != cached_day or not this_month:
        today = time.gmtime(now)
        this_month = today.tm_year * 12 + today.tm_mon
        _this_month[0] = (day, this_month)
    return (2000 + int(yymm[:2])) * 12 + month < this_month
