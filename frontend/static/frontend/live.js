// The project websocket: JSON events, reconnecting with exponential backoff when it drops.

export function connectLive(path, { onEvent, onStatus = () => {}, minDelay = 1000, maxDelay = 30000 } = {}) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}${path}`;
  let socket = null;
  let delay = minDelay;
  let timer = null;
  let closed = false;

  function open() {
    onStatus("connecting");
    socket = new WebSocket(url);
    socket.addEventListener("open", () => {
      delay = minDelay;
      onStatus("open");
    });
    socket.addEventListener("message", (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      onEvent(event);
    });
    socket.addEventListener("close", (close) => {
      if (closed) return;
      // 4401/4403: not logged in or not a member; retrying will not help.
      if (close.code === 4401 || close.code === 4403) {
        onStatus("refused");
        return;
      }
      onStatus("reconnecting");
      timer = setTimeout(open, delay + Math.random() * 250);
      delay = Math.min(delay * 2, maxDelay);
    });
  }

  open();
  return {
    get connected() {
      return socket !== null && socket.readyState === WebSocket.OPEN;
    },
    // For tests and for going offline on purpose: drop the socket; it reconnects with backoff.
    drop() {
      if (socket) socket.close();
    },
    close() {
      closed = true;
      clearTimeout(timer);
      if (socket) socket.close();
    },
  };
}

// Shows the connection state in a small status element.
export function statusBadge(node) {
  const text = {
    connecting: "Connecting…",
    open: "Live",
    reconnecting: "Connection lost, reconnecting…",
    refused: "Live updates refused; reload the page after logging in again.",
  };
  return (state) => {
    if (!node) return;
    node.dataset.state = state;
    node.textContent = text[state] || state;
  };
}
