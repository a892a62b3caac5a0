// Small fetch wrapper for the REST API: session cookie + CSRF header, errors as readable sentences.

export class ApiError extends Error {
  constructor(message, status, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

// DRF answers {"detail": "..."} or {"field": ["..."]}; turn either into one sentence.
export function errorMessage(body, status) {
  if (body && typeof body === "object") {
    if (typeof body.detail === "string") return body.detail;
    const parts = Object.entries(body).map(([field, value]) => {
      const text = Array.isArray(value) ? value.join(" ") : String(value);
      return field === "non_field_errors" ? text : `${field}: ${text}`;
    });
    if (parts.length) return parts.join(" ");
  }
  if (status === 404) return "Not found: this server does not offer that yet, or you cannot see it.";
  if (status === 403) return "You are not allowed to do this in this project.";
  if (status >= 500) return `The server failed (HTTP ${status}). Try again in a moment.`;
  return `The request failed (HTTP ${status}).`;
}

// Returns parsed JSON, or null for 204. Throws ApiError (with .status) for any other outcome.
export async function api(url, { method = "GET", body, signal } = {}) {
  const headers = { Accept: "application/json" };
  const init = { method, headers, credentials: "same-origin", signal };
  if (method !== "GET" && method !== "HEAD") headers["X-CSRFToken"] = csrfToken();
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError("The server cannot be reached. Check your connection; this page retries.", 0, null);
  }
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await response.json().catch(() => null) : null;
  if (!response.ok) throw new ApiError(errorMessage(data, response.status), response.status, data);
  return data;
}

// Reads the JSON a template put in <script type="application/json" id="...">.
export function pageConfig(id = "page-config") {
  return JSON.parse(document.getElementById(id).textContent);
}

// Label colours reach the page as data-colour attributes, set here as the --label-colour custom
// property: the Content-Security-Policy refuses style="" attributes, not styles set from a script.
export function paintLabelColours(root = document) {
  for (const node of root.querySelectorAll("[data-colour]")) {
    node.style.setProperty("--label-colour", node.dataset.colour);
  }
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style") node.style.cssText = value; // CSSOM: allowed where style="" is not
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// True while the user types in a form field, where single-key shortcuts must not fire.
export function isTyping(target) {
  return target instanceof HTMLElement && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
}
