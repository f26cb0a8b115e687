/**
 * realtime.js: live invalidations from a cdc-dashboard gateway, as a dependency-free ES module.
 *
 *   import { connectDashboard } from "/static/realtime.js";
 *   const live = connectDashboard({ baseUrl, businessId, token, queryClient, onToast, onStatus });
 *
 * The gateway streams `invalidate` events that name TanStack Query keys (["dashboard-stats", id], ...).
 * This module opens that stream and calls `queryClient.invalidateQueries({ queryKey })` for exactly the keys
 * an event names, so the app refetches only what changed. A live event may also carry the fresh data of some
 * keys (`"figures": {"dashboard-stats": STATS_BODY}`, STATS_BODY being what `GET /stats` would answer): those
 * keys are set with `queryClient.setQueryData([name, businessId], body)` and not refetched, so a pushed
 * update costs no request. A pushed body never replaces cached data whose `as_of_event_id` is higher (a fetch
 * that raced ahead of the stream); an in-flight fetch of a pushed key is cancelled first (`cancelQueries`, when
 * the client has it), so an older answer cannot land over the pushed one. A client without `setQueryData`
 * gets the pushed keys invalidated instead, as before. It also:
 *   - resumes where it left off (Last-Event-ID) after any disconnect, so no payment is missed;
 *   - on `resync` (the gateway no longer holds the events we missed) invalidates everything of the business;
 *   - coalesces a burst of events into one invalidation per key;
 *   - when the stream is down, polls (invalidates everything) every 15 s while it keeps trying to get back
 *     to live;
 *   - takes a token that is a string or a function (sync or async), called before every (re)connect, and
 *     `setToken()` to switch to a renewed token at once.
 *
 * Docs and a React example: docs/REALTIME_JS.md.
 */

/** Connection states reported to `onStatus`; the bundled page shows them verbatim. */
export const Status = Object.freeze({
  LIVE: "live",
  RECONNECTING: "reconnecting",
  POLLING: "polling",
  CLOSED: "closed",
});

/** The query keys the gateway's events name (each used as [name, businessId]). */
export const QUERY_KEY_NAMES = Object.freeze([
  "dashboard-stats",
  "business-revenue",
  "business-data",
  "transactions",
  "client-business-transactions",
  "payment-transactions",
  "payments",
  "bookings",
]);

const DEFAULTS = Object.freeze({
  pollIntervalMs: 15000,
  // Events closer together than this share one invalidation per key. Short enough to stay well inside the
  // "within a second" promise, long enough to fold a webhook's 3-4 table writes into one refetch.
  coalesceMs: 75,
  // How long a broken stream may stay "reconnecting" before the data is polled: a gateway restart or a
  // network blip usually heals within this, and polling then would only add load.
  pollAfterMs: 3000,
  minBackoffMs: 500,
  maxBackoffMs: 15000,
  // A tab hidden longer than this reconnects when shown again (see onVisible).
  resumeAfterHiddenMs: 30000,
  // Toast de-duplication memory (payment ids). Replays after a reconnect must not toast twice.
  toastMemory: 500,
});

/**
 * Connect a dashboard to its business's event stream.
 *
 * @param {object} options
 * @param {string} [options.baseUrl] gateway origin (and path prefix), e.g. "https://dash.example.com";
 *   "" (default) means the page's own origin.
 * @param {string} options.businessId the business UUID.
 * @param {string | (() => string | Promise<string>)} options.token dashboard token, or a function that returns
 *   a fresh one; it is called before every connection, so renewal happens on reconnect.
 * @param {{ invalidateQueries: (filters: object) => unknown, getQueryData?: (key: unknown[]) => unknown,
 *   setQueryData?: (key: unknown[], data: unknown) => unknown, cancelQueries?: (filters: object) => unknown }}
 *   options.queryClient a TanStack Query QueryClient, or anything with the same shape: invalidateQueries is
 *   required; setQueryData (with getQueryData) lets pushed figures replace a refetch; cancelQueries keeps an
 *   older in-flight fetch from landing over pushed data.
 * @param {number | null} [options.lastEventId] resume after this event: pass the `as_of_event_id` of the
 *   stats you already rendered. When omitted it is read from the cached ["dashboard-stats", id] data; when
 *   that is absent too, the stream starts now and everything is invalidated once it is open.
 * @param {(payment: object) => void} [options.onToast] called once per payment that became `completed`.
 * @param {(status: string) => void} [options.onStatus] "live" | "reconnecting" | "polling" | "closed".
 * @param {(event: {type: string, id: number | null, data: object | null}) => void} [options.onEvent] every
 *   event, after its invalidations were scheduled and its pushed figures handed on (for logs and debugging).
 * @param {number} [options.pollIntervalMs] polling period while the stream is down (15000).
 * @param {number} [options.coalesceMs] burst window (75).
 * @param {number} [options.pollAfterMs] time to stay "reconnecting" before polling (3000).
 * @param {number} [options.resumeAfterHiddenMs] a tab hidden longer reconnects when shown (30000).
 * @param {typeof EventSource} [options.EventSource] an EventSource implementation (polyfills, tests).
 * @returns {{ close(): void, setToken(token: string | (() => string | Promise<string>)): void,
 *   reconnect(): void, invalidateAll(): Promise<unknown>, readonly status: string,
 *   readonly lastEventId: number | null }}
 */
export function connectDashboard(options) {
  const opts = { ...DEFAULTS, ...options };
  const { businessId, queryClient } = opts;
  if (!businessId) throw new TypeError("connectDashboard: businessId is required");
  if (!queryClient || typeof queryClient.invalidateQueries !== "function") {
    throw new TypeError("connectDashboard: queryClient must have invalidateQueries()");
  }
  const EventSourceImpl = opts.EventSource ?? globalThis.EventSource;
  const onToast = opts.onToast ?? (() => {});
  const onStatus = opts.onStatus ?? (() => {});
  const onEvent = opts.onEvent ?? (() => {});
  const business = String(businessId).toLowerCase();

  let token = opts.token;
  let lastEventId = initialEventId(opts, queryClient, business);
  // Set per connection: without a position to resume from, events between the app's fetch and our
  // subscription could be lost; refetching everything once the stream is open closes that gap.
  let invalidateOnOpen = false;

  let status = null;
  let source = null;
  let closed = false;
  let generation = 0; // bumps on every (re)connect, so late callbacks of an old EventSource are ignored
  let failures = 0;
  let reconnectTimer = null;
  let pollAfterTimer = null;
  let pollTimer = null;
  let flushTimer = null;
  const pendingKeys = new Map(); // JSON(key) -> key, flushed once per coalescing window
  const toasted = new Set();

  function setStatus(next) {
    if (status === next) return;
    status = next;
    try {
      onStatus(next);
    } catch (err) {
      console.error("realtime.js: onStatus threw", err);
    }
  }

  function eventsUrl(tokenValue) {
    const base = String(opts.baseUrl ?? "").replace(/\/+$/, "");
    const params = new URLSearchParams();
    if (tokenValue) params.set("access_token", tokenValue);
    // Our own reconnects pass the position explicitly: a new EventSource does not carry the old one's
    // Last-Event-ID header.
    if (lastEventId !== null) params.set("last_event_id", String(lastEventId));
    return `${base}/v1/businesses/${encodeURIComponent(business)}/events?${params}`;
  }

  async function currentToken() {
    return typeof token === "function" ? await token() : token;
  }

  async function connect() {
    if (closed) return;
    const mine = ++generation;
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (source) {
      source.close();
      source = null;
    }
    let tokenValue;
    try {
      tokenValue = await currentToken();
    } catch (err) {
      console.error("realtime.js: token function failed", err);
      if (mine === generation) streamFailed(mine);
      return;
    }
    if (closed || mine !== generation) return;
    invalidateOnOpen = lastEventId === null;
    const es = new EventSourceImpl(eventsUrl(tokenValue));
    source = es;
    es.onopen = () => {
      if (mine !== generation) return;
      streamOpened();
    };
    // The browser would reconnect by itself, but only with the old URL (old token) and on its own schedule;
    // we close and reconnect ourselves so every attempt uses a fresh token and the newest position.
    es.onerror = () => {
      if (mine !== generation) return;
      es.close();
      streamFailed(mine);
    };
    es.addEventListener("invalidate", (e) => {
      if (mine === generation) handleInvalidate(e);
    });
    es.addEventListener("resync", (e) => {
      if (mine === generation) handleResync(e);
    });
  }

  function streamOpened() {
    failures = 0;
    clearTimeout(pollAfterTimer);
    pollAfterTimer = null;
    stopPolling();
    setStatus(Status.LIVE);
    if (invalidateOnOpen) {
      invalidateOnOpen = false;
      invalidateAll();
    }
  }

  function streamFailed(mine) {
    if (closed || mine !== generation) return;
    source = null;
    failures += 1;
    if (status !== Status.POLLING) setStatus(Status.RECONNECTING);
    if (!pollTimer && !pollAfterTimer) {
      pollAfterTimer = setTimeout(() => {
        pollAfterTimer = null;
        if (!closed && status !== Status.LIVE) startPolling();
      }, opts.pollAfterMs);
    }
    // Exponential backoff with jitter, so a restarted gateway is not hit by every dashboard at the same
    // instant.
    const ceiling = Math.min(opts.maxBackoffMs, opts.minBackoffMs * 2 ** Math.min(failures - 1, 10));
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    clearTimeout(reconnectTimer);
    reconnectTimer = setTimeout(connect, delay);
  }

  function parseId(raw) {
    if (raw === undefined || raw === null || raw === "") return null;
    const n = Number(raw);
    return Number.isSafeInteger(n) ? n : null;
  }

  function handleInvalidate(e) {
    const id = parseId(e.lastEventId);
    // Ids strictly increase; one at or below our position is a replay we already applied.
    if (id !== null && lastEventId !== null && id <= lastEventId) return;
    if (id !== null) lastEventId = id;
    let data;
    try {
      data = JSON.parse(e.data);
    } catch (err) {
      console.error("realtime.js: unreadable event data", err);
      invalidateAll(); // we know something changed, not what: refetch everything rather than go stale
      return;
    }
    if (data.business_id && String(data.business_id).toLowerCase() !== business) return;
    const pushed = applyFigures(data.figures);
    for (const key of data.query_keys ?? []) {
      if (!Array.isArray(key)) continue;
      const hash = JSON.stringify(key);
      if (!pushed.has(hash)) pendingKeys.set(hash, key);
    }
    // A pushed body includes every event up to this one, so an invalidation still waiting in the coalescing
    // window for an earlier event is covered by it too.
    for (const hash of pushed) pendingKeys.delete(hash);
    scheduleFlush();
    for (const payment of data.payments ?? []) {
      if (payment.status !== "completed" || toasted.has(payment.id)) continue;
      remember(payment.id);
      try {
        onToast(payment);
      } catch (err) {
        console.error("realtime.js: onToast threw", err);
      }
    }
    onEvent({ type: "invalidate", id, data });
  }

  /**
   * Set the query data of every key the event carries fresh data for. Returns the keys (as JSON) it took
   * care of, so they are not also refetched; a body that does not look like figures of this business is
   * left out, and its key is then invalidated as usual.
   */
  function applyFigures(figures) {
    const pushed = new Set();
    if (!figures || typeof figures !== "object" || typeof queryClient.setQueryData !== "function") return pushed;
    for (const [name, body] of Object.entries(figures)) {
      if (!isFiguresOf(body, business)) continue;
      const queryKey = [name, business];
      pushed.add(JSON.stringify(queryKey));
      setIfNotOlder(queryKey, body);
    }
    return pushed;
  }

  function setIfNotOlder(queryKey, body) {
    // Cancel first: a fetch already in flight may have read the database before this event and would
    // otherwise land after (and over) the pushed body. TanStack restores a cancelled fetch's earlier state
    // (revert), so the data is set only once the cancellation has settled, as its optimistic-update recipe
    // does; the comparison below then sees what the cache really holds.
    Promise.resolve(queryClient.cancelQueries?.({ queryKey, exact: true }))
      .then(() => {
        const cached = queryClient.getQueryData?.(queryKey);
        // Newer data already cached (a fetch that raced ahead of the stream, or a later push): keep it, never
        // go backwards.
        if (Number.isSafeInteger(cached?.as_of_event_id) && cached.as_of_event_id > body.as_of_event_id) return;
        return queryClient.setQueryData(queryKey, body);
      })
      .catch((err) => {
        console.error("realtime.js: setQueryData failed; refetching instead", err);
        Promise.resolve(queryClient.invalidateQueries({ queryKey })).catch(() => {});
      });
  }

  function handleResync(e) {
    // After a resync the gateway's history restarts from where it says; do not drop its next ids as
    // "already seen".
    lastEventId = parseId(e.lastEventId);
    invalidateAll();
    onEvent({ type: "resync", id: lastEventId, data: null });
  }

  function remember(paymentId) {
    toasted.add(paymentId);
    if (toasted.size > opts.toastMemory) toasted.delete(toasted.values().next().value);
  }

  function scheduleFlush() {
    if (flushTimer || pendingKeys.size === 0) return;
    flushTimer = setTimeout(flush, opts.coalesceMs);
  }

  function flush() {
    flushTimer = null;
    const keys = [...pendingKeys.values()];
    pendingKeys.clear();
    for (const queryKey of keys) {
      // TanStack refetches active queries and cancels any fetch already in flight for them (which may have
      // read data from before this event), so the data that lands includes the event.
      Promise.resolve(queryClient.invalidateQueries({ queryKey })).catch((err) =>
        console.error("realtime.js: invalidateQueries failed", err),
      );
    }
  }

  /** Invalidate every query of this business: keys whose second element is the business id. */
  function invalidateAll() {
    pendingKeys.clear();
    clearTimeout(flushTimer);
    flushTimer = null;
    return Promise.resolve(
      queryClient.invalidateQueries({
        predicate: (query) => belongsToBusiness(query.queryKey, business),
      }),
    ).catch((err) => console.error("realtime.js: invalidateQueries failed", err));
  }

  function startPolling() {
    if (pollTimer) return;
    setStatus(Status.POLLING);
    invalidateAll(); // the first poll at once: the data may already be a few seconds old
    pollTimer = setInterval(invalidateAll, opts.pollIntervalMs);
  }

  function stopPolling() {
    clearInterval(pollTimer);
    pollTimer = null;
  }

  // A phone that wakes up or regains its network should not wait for the next backoff step.
  function retryNow() {
    if (!closed && status !== Status.LIVE) connect();
  }
  // After a phone slept, its stream may be a dead TCP connection the browser still calls open (EventSource
  // does not expose the gateway's heartbeats, so we cannot tell). Reconnecting costs one request and loses
  // nothing (resume by id), so a tab that was hidden for a while always does.
  let hiddenAt = null;
  function onVisible() {
    if (globalThis.document?.visibilityState !== "visible") {
      hiddenAt = Date.now();
      return;
    }
    const away = hiddenAt === null ? 0 : Date.now() - hiddenAt;
    hiddenAt = null;
    if (!closed && away > opts.resumeAfterHiddenMs) connect();
    else retryNow();
  }
  globalThis.addEventListener?.("online", retryNow);
  globalThis.document?.addEventListener?.("visibilitychange", onVisible);

  connect();

  return {
    /** Stop streaming and polling for good. */
    close() {
      closed = true;
      generation += 1;
      source?.close();
      source = null;
      for (const t of [reconnectTimer, pollAfterTimer, flushTimer]) clearTimeout(t);
      stopPolling();
      globalThis.removeEventListener?.("online", retryNow);
      globalThis.document?.removeEventListener?.("visibilitychange", onVisible);
      setStatus(Status.CLOSED);
    },
    /** Use a new token (string or function) and reconnect with it now; nothing is missed (resume). */
    setToken(next) {
      token = next;
      if (!closed) connect();
    },
    /** Reconnect now instead of waiting for the next backoff step. */
    reconnect() {
      if (!closed) connect();
    },
    /** Invalidate every query of the business (what a resync or a poll does). */
    invalidateAll,
    get status() {
      return status;
    },
    get lastEventId() {
      return lastEventId;
    },
  };
}

/** True when a pushed body is figures of the business: an object with an integer `as_of_event_id`. */
function isFiguresOf(body, business) {
  if (!body || typeof body !== "object" || !Number.isSafeInteger(body.as_of_event_id)) return false;
  return body.business_id === undefined || String(body.business_id).toLowerCase() === business;
}

/** True when a query key belongs to the business: [name, businessId, ...]. */
export function belongsToBusiness(queryKey, businessId) {
  return (
    Array.isArray(queryKey) &&
    queryKey.length >= 2 &&
    String(queryKey[1]).toLowerCase() === String(businessId).toLowerCase()
  );
}

function initialEventId(opts, queryClient, business) {
  if (opts.lastEventId !== undefined && opts.lastEventId !== null) return Number(opts.lastEventId);
  const cached = queryClient.getQueryData?.(["dashboard-stats", business]);
  const asOf = cached?.as_of_event_id;
  return Number.isSafeInteger(asOf) ? asOf : null;
}

/**
 * Format minor units as a person reads money: formatMoney(150000, "KES") === "KES 1,500.00".
 * Uses integer arithmetic so large totals do not pick up floating-point noise.
 */
export function formatMoney(minor, currency) {
  const value = Number(minor) || 0;
  const sign = value < 0 ? "-" : "";
  const abs = Math.abs(Math.trunc(value));
  const whole = Math.trunc(abs / 100);
  const cents = String(abs % 100).padStart(2, "0");
  const grouped = whole.toLocaleString("en-US");
  return `${currency ? `${currency} ` : ""}${sign}${grouped}.${cents}`;
}

const METHOD_NAMES = {
  mpesa: "M-Pesa",
  paystack: "Paystack",
  card: "Card",
  cash: "Cash",
  bank_transfer: "Bank transfer",
  other: "Other",
};

/** A payment method as shown to people: "mpesa" -> "M-Pesa". */
export function methodName(method) {
  return METHOD_NAMES[method] ?? String(method ?? "").replace(/_/g, " ");
}

/** The toast text for a completed payment: "KES 1,500.00 from Achieng via M-Pesa". */
export function toastText(payment) {
  const amount = formatMoney(payment.amount_minor, payment.currency);
  const from = payment.client_name ? ` from ${payment.client_name}` : "";
  return `${amount}${from} via ${methodName(payment.method)}`;
}
