/**
 * The bundled live dashboard page. No build step: plain ES modules served by the gateway under /static/.
 *
 * Data flows the way a TanStack Query app's would: every figure is a query with a key
 * (["dashboard-stats", id], ...), realtime.js invalidates the keys the gateway's events name, and an
 * invalidated query refetches and re-renders. When an event carries a key's fresh data (the stats), realtime.js
 * sets it instead and the page renders it without a request. `QueryCache` below is a tiny stand-in for
 * TanStack's QueryClient with the same `invalidateQueries({ queryKey | predicate })`, `setQueryData`,
 * `getQueryData` and `cancelQueries` shapes, so the page exercises realtime.js exactly as an app would.
 */
import { connectDashboard, formatMoney, methodName, toastText, Status } from "./realtime.js";

const TRANSACTIONS_LIMIT = 20;
const TOAST_MS = 6000;
const MAX_TOASTS = 4;
const PAYMENT_STATUSES = ["paid", "partially_paid", "pending", "unpaid", "refunded"];
const BOOKING_STATUSES = ["confirmed", "pending", "completed", "cancelled", "no_show"];

// ---------------------------------------------------------------------------------------------------------
// A minimal query cache with TanStack Query's invalidateQueries / setQueryData / cancelQueries shapes.

class QueryCache {
  constructor() {
    /** @type {Map<string, {queryKey: unknown[], fetcher: (signal: AbortSignal) => Promise<unknown>,
     *   onData: (data: unknown) => void, data: unknown, failed: boolean, controller: AbortController | null}>} */
    this.queries = new Map();
  }

  /** Register a query; it is fetched by the first invalidation (or `fetchAll`). */
  define(queryKey, fetcher, onData) {
    this.queries.set(JSON.stringify(queryKey), {
      queryKey,
      fetcher,
      onData,
      data: undefined,
      failed: false,
      controller: null,
    });
  }

  getQueryData(queryKey) {
    return this.queries.get(JSON.stringify(queryKey))?.data;
  }

  /** Data that arrived some other way (pushed with an event): store and render it, as a fetch would. */
  setQueryData(queryKey, data) {
    const query = this.queries.get(JSON.stringify(queryKey));
    if (!query) return undefined; // a key this page does not show
    query.data = data;
    query.failed = false;
    query.onData(data);
    onFetched();
    return data;
  }

  /** Abort the fetches in flight of the matching queries (`exact`, or `queryKey` as a prefix). */
  cancelQueries({ queryKey, exact = false } = {}) {
    for (const query of this.matching({ queryKey, exact })) query.controller?.abort();
    return Promise.resolve();
  }

  matching({ queryKey, predicate, exact = false } = {}) {
    return [...this.queries.values()].filter((query) => {
      if (predicate) return predicate(query);
      if (!queryKey) return true;
      if (exact && queryKey.length !== query.queryKey.length) return false;
      return queryKey.every((part, i) => JSON.stringify(part) === JSON.stringify(query.queryKey[i]));
    });
  }

  /** Refetch every query that matches: `queryKey` as a prefix (TanStack's default), or a `predicate`. */
  invalidateQueries({ queryKey, predicate } = {}) {
    return Promise.all(this.matching({ queryKey, predicate }).map((query) => this.fetch(query)));
  }

  fetchAll() {
    return this.invalidateQueries({});
  }

  /** Refetch the queries whose last fetch failed (e.g. when the connection comes back). */
  refetchFailed() {
    return Promise.all([...this.queries.values()].filter((q) => q.failed).map((q) => this.fetch(q)));
  }

  async fetch(query) {
    // A fetch in flight may have read the database before the event that invalidated it; cancel it so the
    // result that lands is the newer one (what TanStack's cancelRefetch does).
    query.controller?.abort();
    const controller = new AbortController();
    query.controller = controller;
    try {
      // Like TanStack's default: a failed fetch is retried a few times (1 s, 2 s) before it counts as failed.
      for (let attempt = 0; ; attempt += 1) {
        try {
          const data = await query.fetcher(controller.signal);
          if (controller.signal.aborted) return;
          query.data = data;
          query.failed = false;
          query.onData(data);
          onFetched();
          return;
        } catch (err) {
          if (controller.signal.aborted || err?.name === "AbortError") return;
          if (attempt >= 2 || isAuthError(err)) throw err;
          await sleep(1000 * 2 ** attempt, controller.signal);
        }
      }
    } catch (err) {
      if (controller.signal.aborted || err?.name === "AbortError") return;
      query.failed = true;
      onFetchFailed(err);
    } finally {
      if (query.controller === controller) query.controller = null;
    }
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// Where we are and who we are.

const params = new URLSearchParams(window.location.search);
const token = params.get("access_token") ?? "";
const metaId = document.querySelector('meta[name="cdc-business-id"]')?.content ?? "";
const businessId = (/^[0-9a-f-]{36}$/i.test(metaId) ? metaId : window.location.pathname.split("/").pop())
  .toLowerCase();
// The page lives at <prefix>/dashboard/<id>; the API at <prefix>/v1/... (works behind a path-prefix proxy).
const baseUrl = new URL("../", window.location.origin + window.location.pathname).href.replace(/\/$/, "");

const state = {
  timezone: undefined, // the business's IANA zone once business-data arrives; the browser's until then
  chartRange: "today",
  chartCurrency: null,
  revenue: null,
  authFailed: false,
};

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, { method = "GET", signal } = {}) {
  const response = await fetch(`${baseUrl}${path}`, {
    method,
    signal,
    // The header keeps the token out of access logs; only EventSource needs it in the URL.
    headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
    cache: "no-cache", // revalidate every time; an unchanged figure costs a 304, not a body
  });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = body.detail ?? body.error ?? detail;
    } catch {
      // not JSON: keep the status text
    }
    throw new HttpError(response.status, String(detail));
  }
  return response.json();
}

const businessPath = `/v1/businesses/${encodeURIComponent(businessId)}`;

// ---------------------------------------------------------------------------------------------------------
// Formatting.

const byId = (id) => document.getElementById(id);
const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);
const integer = new Intl.NumberFormat("en-US");

function moneyText(perCurrency, field) {
  const entries = Object.entries(perCurrency ?? {}).sort(([a], [b]) => a.localeCompare(b));
  if (entries.length === 0) return formatMoney(0, "");
  return entries.map(([currency, figures]) => formatMoney(figures?.[field] ?? 0, currency)).join(" · ");
}

function timeFormat(options) {
  try {
    return new Intl.DateTimeFormat("en-GB", { ...options, timeZone: state.timezone });
  } catch {
    return new Intl.DateTimeFormat("en-GB", options); // an unknown zone name: fall back to the browser's
  }
}

/** The calendar date parts ({year, month, day}) of an instant in the business's timezone. */
function localDay(date) {
  return timeFormat({ year: "numeric", month: "2-digit", day: "2-digit" })
    .formatToParts(date)
    .reduce((acc, part) => ({ ...acc, [part.type]: part.value }), {});
}
/** The same day as "YYYY-MM-DD". */
function dayKey(date) {
  const p = localDay(date);
  return `${p.year}-${p.month}-${p.day}`;
}

function transactionTime(iso) {
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return "";
  const sameDay = dayKey(when) === dayKey(new Date());
  return sameDay
    ? timeFormat({ hour: "2-digit", minute: "2-digit" }).format(when)
    : timeFormat({ day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" }).format(when);
}

const humanize = (s) => String(s ?? "").replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child ?? "");
  return node;
}

// ---------------------------------------------------------------------------------------------------------
// Rendering.

function renderStats(stats) {
  byTestId("revenue-today").textContent = moneyText(stats.revenue, "today_minor");
  byTestId("revenue-month").textContent = moneyText(stats.revenue, "month_minor");
  byTestId("revenue-total").textContent = moneyText(stats.revenue, "total_minor");
  byTestId("payments-count").textContent = integer.format(stats.payments_count ?? 0);
  byTestId("clients-total").textContent = integer.format(stats.clients_total ?? 0);
  byTestId("clients-new-today").textContent = integer.format(stats.clients_new_today ?? 0);
  renderCounts(byTestId("bookings-by-payment-status"), stats.bookings?.by_payment_status, PAYMENT_STATUSES);
  renderCounts(byTestId("bookings-by-status"), stats.bookings?.by_status, BOOKING_STATUSES);
}

function renderCounts(list, counts = {}, order) {
  // Known statuses always show (a zero is information too), then any status this page does not know yet.
  const names = [...order, ...Object.keys(counts).filter((name) => !order.includes(name))];
  list.replaceChildren(
    ...names.map((name) => {
      const count = counts[name] ?? 0;
      return el(
        "li",
        { "data-status": name, class: count ? "" : "zero" },
        el("span", { class: "label" }, humanize(name)),
        " ",
        el("span", { class: "count" }, integer.format(count)),
      );
    }),
  );
}

function renderBusiness(business) {
  const profile = business.business ?? business;
  if (profile.timezone) state.timezone = profile.timezone;
  if (profile.name) {
    byId("business-name").textContent = profile.name;
    document.title = `${profile.name} · payments`;
  }
}

let shownTransactions = null; // ids already on screen, to highlight the rows that are new

function renderTransactions(body) {
  const rows = body.items ?? []; // newest first, as the gateway sends them
  const list = byTestId("transactions");
  const before = shownTransactions;
  shownTransactions = new Set(rows.map((tx) => tx.id));
  list.replaceChildren(
    ...rows.map((tx) => {
      const status = tx.status ?? "";
      const client = tx.client_name ?? "";
      const when = tx.at ?? tx.paid_at ?? tx.created_at; // `at`: when it was paid, else created
      // A partial refund leaves the payment completed; revenue counts what is left, so say what went back.
      const refunded = status === "completed" && tx.refunded_minor > 0
        ? ` · ${formatMoney(tx.refunded_minor, tx.currency)} refunded`
        : "";
      return el(
        "li",
        { "data-id": tx.id, "data-status": status, class: before && !before.has(tx.id) ? "fresh" : null },
        el("span", { class: "tx-client" }, client || "Walk-in client"),
        el("span", { class: "tx-amount" }, formatMoney(tx.amount_minor, tx.currency)),
        el(
          "span",
          { class: "tx-meta" },
          el("time", { datetime: when }, transactionTime(when)),
          ` · ${methodName(tx.method)}${refunded}`,
        ),
        el("span", { class: `tx-status status-${status}` }, humanize(status)),
      );
    }),
  );
  byId("transactions-empty").hidden = rows.length > 0;
}

// ---- the revenue chart: a hand-drawn SVG bar chart (no library to vendor, nothing to download) ----

/** A /revenue body ({series: {KES: [{bucket, revenue_minor}, ...]}}) as {currency: Map(bucket key -> minor)}. */
function seriesByCurrency(body, granularity, keep = () => true) {
  const out = {};
  for (const [currency, points] of Object.entries(body?.series ?? {})) {
    const series = (out[currency] = new Map());
    for (const point of points) {
      if (!keep(point.bucket)) continue;
      const key = bucketKey(point.bucket, granularity);
      series.set(key, (series.get(key) ?? 0) + Number(point.revenue_minor ?? 0));
    }
  }
  return out;
}

// Buckets come labelled in the business's local time ("2026-11-27" for a day, "2026-11-27T14:00:00+03:00"
// for an hour), so their local date and hour can be read off the label without any timezone arithmetic.
const LOCAL_LABEL = /^(\d{4}-\d{2}-\d{2})(?:T(\d{2}))?/;

/** The local calendar day of a bucket label (falls back to converting an instant). */
function localDate(at, granularity) {
  const m = LOCAL_LABEL.exec(String(at));
  if (m && (granularity === "day" || m[2] !== undefined)) return m[1];
  return dayKey(new Date(at));
}

/** Bucket identity: "YYYY-MM-DD" for days, the local hour "HH" for hours. */
function bucketKey(at, granularity) {
  if (granularity === "day") return localDate(at, "day");
  const m = LOCAL_LABEL.exec(String(at));
  if (m && m[2] !== undefined) return m[2];
  return timeFormat({ hour: "2-digit", hourCycle: "h23" }).format(new Date(at));
}

function chartBuckets(range) {
  if (range === "today") {
    return Array.from({ length: 24 }, (_, h) => {
      const key = String(h).padStart(2, "0");
      return { key, label: key, tick: h % 3 === 0, major: h % 6 === 0 };
    });
  }
  // The last 30 local days, oldest first. Stepping by 24 h from noon never skips or repeats a day at DST.
  const today = localDay(new Date());
  const noon = Date.UTC(Number(today.year), Number(today.month) - 1, Number(today.day), 12);
  return Array.from({ length: 30 }, (_, i) => {
    const d = new Date(noon - (29 - i) * 86400000);
    const key = d.toISOString().slice(0, 10);
    return { key, label: `${d.getUTCDate()} ${d.toLocaleString("en-GB", { month: "short", timeZone: "UTC" })}`, tick: (29 - i) % 7 === 0, major: (29 - i) % 14 === 0 };
  });
}

/** The axis top: the largest value rounded up to 1, 2, 2.5 or 5 times a power of ten (in major units). */
function niceCeiling(minor) {
  if (minor <= 0) return 0;
  const major = minor / 100;
  const power = 10 ** Math.floor(Math.log10(major));
  const step = [1, 2, 2.5, 5, 10].find((f) => f * power >= major);
  return step * power * 100;
}

function compact(minor) {
  const major = minor / 100;
  const short = (value, suffix) => `${Number(value.toFixed(1))}${suffix}`; // 12.5k, 25k, 1.2M
  if (major >= 1e6) return short(major / 1e6, "M");
  if (major >= 1e3) return short(major / 1e3, "k");
  return String(Math.round(major));
}

function renderChart() {
  const container = byId("chart");
  const revenue = state.revenue;
  if (!revenue) return;
  const granularity = state.chartRange === "today" ? "hour" : "day";
  const data = revenue[state.chartRange] ?? {};
  const currencies = Object.keys(data).sort();
  const select = byId("chart-currency");
  if (!currencies.includes(state.chartCurrency)) state.chartCurrency = currencies[0] ?? null;
  select.hidden = currencies.length < 2;
  select.replaceChildren(...currencies.map((c) => el("option", { value: c }, c)));
  if (state.chartCurrency) select.value = state.chartCurrency;

  const points = data[state.chartCurrency] ?? new Map();
  const buckets = chartBuckets(state.chartRange);
  const values = buckets.map((b) => points.get(b.key) ?? 0);
  const max = niceCeiling(Math.max(...values, 0));

  // Drawn at the container's real width (redrawn on resize) so text is never stretched on a narrow phone.
  const W = Math.max(280, Math.round(container.clientWidth || 640));
  const H = 200;
  const pad = { top: 12, right: 8, bottom: 26, left: 44 };
  const plotW = W - pad.left - pad.right;
  const plotH = H - pad.top - pad.bottom;
  const step = plotW / buckets.length;
  const narrow = W < 480; // fewer axis labels where they would collide
  const ns = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "bars" });
  // Three gridlines with their values, so a bar can be read without hovering (phones cannot hover).
  for (const fraction of [0, 0.5, 1]) {
    const y = pad.top + plotH * (1 - fraction);
    root.append(svg("line", { x1: pad.left, x2: W - pad.right, y1: y, y2: y, class: "grid" }));
    root.append(svg("text", { x: pad.left - 6, y: y + 4, class: "axis", "text-anchor": "end" }, compact(max * fraction)));
  }
  buckets.forEach((bucket, i) => {
    const value = values[i];
    const h = max > 0 ? (value / max) * plotH : 0;
    const x = pad.left + i * step + step * 0.15;
    const bar = svg("rect", {
      x,
      y: pad.top + plotH - h,
      width: step * 0.7,
      height: Math.max(h, value > 0 ? 1 : 0),
      rx: 2,
      class: "bar",
    });
    bar.append(svg("title", {}, `${bucket.label}${state.chartRange === "today" ? ":00" : ""}: ${formatMoney(value, state.chartCurrency ?? "")}`));
    root.append(bar);
    if (bucket.tick && (!narrow || bucket.major)) {
      root.append(svg("text", { x: x + step * 0.35, y: H - 8, class: "axis", "text-anchor": "middle" }, bucket.label));
    }
  });
  const total = values.reduce((a, b) => a + b, 0);
  container.setAttribute(
    "aria-label",
    `Revenue ${state.chartRange === "today" ? "today by hour" : "over 30 days by day"}: ${formatMoney(total, state.chartCurrency ?? "")}`,
  );
  container.replaceChildren(root);
  if (!state.chartCurrency) container.append(el("p", { class: "empty" }, "No revenue in this period."));
}

async function fetchRevenue(signal) {
  // The gateway's defaults are what the chart shows: the last 24 hours by hour (today's hours are among
  // them) and the last 30 days by day, in the business's timezone, zero-filled.
  const [hours, days] = await Promise.all([
    api(`${businessPath}/revenue?granularity=hour`, { signal }),
    api(`${businessPath}/revenue?granularity=day`, { signal }),
  ]);
  return { hours, days };
}

function renderRevenue({ hours, days }) {
  // The series name their timezone; it may arrive before business-data does.
  state.timezone ??= hours.timezone ?? days.timezone;
  const today = dayKey(new Date());
  state.revenue = {
    today: seriesByCurrency(hours, "hour", (at) => localDate(at, "hour") === today),
    "30d": seriesByCurrency(days, "day"),
  };
  renderChart();
}

// ---------------------------------------------------------------------------------------------------------
// Toasts, status, errors.

function showToast(payment) {
  const box = byId("toasts");
  const toast = el("div", { class: "toast", "data-testid": "toast", role: "status" }, toastText(payment));
  box.append(toast);
  while (box.children.length > MAX_TOASTS) box.firstElementChild.remove();
  setTimeout(() => {
    toast.classList.add("leaving");
    setTimeout(() => toast.remove(), 300);
  }, TOAST_MS);
}

function showStatus(status) {
  if (status === Status.CLOSED) return;
  // Back live: the stream replays what changed meanwhile; only fetches that failed need repeating.
  if (status === Status.LIVE) queryClient.refetchFailed();
  byId("connection").dataset.state = status;
  byTestId("connection-status").textContent = status;
}

function showBanner(text) {
  const banner = byId("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

function onFetched() {
  if (!state.authFailed) showBanner("");
  byId("updated-at").textContent = `updated ${timeFormat({ hour: "2-digit", minute: "2-digit", second: "2-digit" }).format(new Date())}`;
}

function isAuthError(err) {
  return err instanceof HttpError && (err.status === 401 || err.status === 403);
}

function onFetchFailed(err) {
  if (isAuthError(err)) {
    state.authFailed = true;
    live?.close();
    showBanner("This dashboard link has expired or is not valid for this business. Ask for a new link.");
    return;
  }
  // Keep showing the last figures; say they may be old. The next poll or event retries.
  showBanner("Could not reach the server; showing the last figures received. Retrying…");
  console.warn("dashboard: fetch failed", err);
}

// ---------------------------------------------------------------------------------------------------------
// Wiring.

const queryClient = new QueryCache();
queryClient.define(["dashboard-stats", businessId], (signal) => api(`${businessPath}/stats`, { signal }), renderStats);
queryClient.define(["business-data", businessId], (signal) => api(businessPath, { signal }), (data) => {
  renderBusiness(data);
  renderChart(); // bucket placement depends on the timezone
});
queryClient.define(["business-revenue", businessId], fetchRevenue, renderRevenue);
queryClient.define(
  ["transactions", businessId],
  (signal) => api(`${businessPath}/transactions?limit=${TRANSACTIONS_LIMIT}`, { signal }),
  renderTransactions,
);

let live = null;

async function refresh() {
  const button = byTestId("refresh");
  button.disabled = true;
  button.classList.add("busy");
  try {
    await api(`${businessPath}/refresh`, { method: "POST" });
  } catch (err) {
    onFetchFailed(err);
  } finally {
    // Refetch even when the rebuild failed: what the server has is still better than what we show.
    await (live ? live.invalidateAll() : queryClient.fetchAll());
    button.disabled = false;
    button.classList.remove("busy");
  }
}

function wireControls() {
  byTestId("refresh").addEventListener("click", refresh);
  for (const tab of document.querySelectorAll(".tabs [data-range]")) {
    tab.addEventListener("click", () => {
      state.chartRange = tab.dataset.range;
      for (const other of document.querySelectorAll(".tabs [data-range]")) {
        other.setAttribute("aria-selected", String(other === tab));
      }
      renderChart();
    });
  }
  let resizeFrame = 0;
  new ResizeObserver(() => {
    cancelAnimationFrame(resizeFrame);
    resizeFrame = requestAnimationFrame(renderChart);
  }).observe(byId("chart"));
  byId("chart-currency").addEventListener("change", (e) => {
    state.chartCurrency = e.target.value;
    renderChart();
  });
}

async function start() {
  wireControls();
  if (!token) {
    showBanner("This link has no access token. Open the dashboard URL you were given.");
    return;
  }
  // First load, then subscribe from the stats' position: events after `as_of_event_id` are replayed, so
  // nothing that commits between this fetch and the subscription is missed, and nothing is applied twice.
  await queryClient.fetchAll();
  if (state.authFailed) return;
  const stats = queryClient.getQueryData(["dashboard-stats", businessId]);
  live = connectDashboard({
    baseUrl,
    businessId,
    token,
    queryClient,
    lastEventId: stats?.as_of_event_id ?? null,
    onToast: showToast,
    onStatus: showStatus,
  });
  // For debugging from the console: window.cdcDashboard.live.status, .lastEventId
  window.cdcDashboard = { live, queryClient };
}

start();
