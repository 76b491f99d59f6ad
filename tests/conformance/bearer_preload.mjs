// Adds `Authorization: Bearer <key>` to the conformance suite's requests to the gateway.
//
// Why this exists: `@modelcontextprotocol/conformance` 0.2.0-alpha.12 has no way to send a
// header with its server scenarios (no flag, no environment variable, no config file; its
// transport is built as `new StreamableHTTPClientTransport(url)` with no request options).
// The gateway refuses every unauthenticated request, so without this the suite could not
// reach anything behind it. Loaded with `node --import`, it injects the header inside the
// suite's own process, on all three HTTP clients the suite uses (global fetch and undici's
// `request`, which share undici's global dispatcher, and `http.request`), and only for
// requests to MCP_GATEWAY_BEARER_ORIGIN. Nothing else about a request changes: no proxy
// hop, so Host/Origin (the DNS-rebinding scenario), streaming and connection behaviour
// reach the gateway exactly as the suite sent them.
//
// Environment: MCP_GATEWAY_BEARER_TOKEN (the API key), MCP_GATEWAY_BEARER_ORIGIN
// (e.g. http://127.0.0.1:8080). Without both it does nothing.

import http from "node:http";
import { createRequire } from "node:module";

const token = process.env.MCP_GATEWAY_BEARER_TOKEN;
const origin = process.env.MCP_GATEWAY_BEARER_ORIGIN;

function sameOrigin(url) {
  try {
    return new URL(url).origin === new URL(origin).origin;
  } catch {
    return false;
  }
}

function hasAuthorization(headers) {
  if (headers == null) return false;
  if (Array.isArray(headers)) {
    // undici's flat [name, value, name, value, ...] form, or [[name, value], ...]
    const names = Array.isArray(headers[0]) ? headers.map((pair) => pair[0]) : headers.filter((_, i) => i % 2 === 0);
    return names.some((name) => String(name).toLowerCase() === "authorization");
  }
  if (typeof headers.has === "function") return headers.has("authorization");
  return Object.keys(headers).some((name) => name.toLowerCase() === "authorization");
}

function withAuthorization(headers) {
  const value = `Bearer ${token}`;
  if (hasAuthorization(headers)) return headers;
  if (headers == null) return { authorization: value };
  if (Array.isArray(headers)) {
    return Array.isArray(headers[0]) ? [...headers, ["authorization", value]] : [...headers, "authorization", value];
  }
  if (typeof headers.entries === "function" && typeof headers.has === "function") {
    return [...headers.entries(), ["authorization", value]].flat();
  }
  return { ...headers, authorization: value };
}

if (token && origin) {
  // fetch() and undici.request() both dispatch through undici's global dispatcher.
  // Load the undici the suite itself imports (resolved from its entry script).
  const requireFromSuite = createRequire(process.argv[1]);
  const undici = requireFromSuite("undici");
  const base = undici.getGlobalDispatcher();
  undici.setGlobalDispatcher(
    base.compose((dispatch) => (options, handler) => {
      const target = new URL(options.path, options.origin);
      if (sameOrigin(target)) options = { ...options, headers: withAuthorization(options.headers) };
      return dispatch(options, handler);
    }),
  );

  // http.request(): the suite's raw header-validation probes use it directly.
  const originalRequest = http.request;
  http.request = function request(options, ...rest) {
    if (options && typeof options === "object" && !(options instanceof URL)) {
      const protocol = options.protocol ?? "http:";
      const host = options.hostname ?? options.host ?? "localhost";
      const bracketed = host.includes(":") && !host.startsWith("[") ? `[${host}]` : host;
      const url = `${protocol}//${bracketed}:${options.port ?? 80}`;
      if (sameOrigin(url)) options = { ...options, headers: withAuthorization(options.headers) };
    }
    return originalRequest.call(this, options, ...rest);
  };
}
